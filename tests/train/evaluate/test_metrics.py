"""Evaluation metrics against hand-computed cases, naive formulas and scikit-learn."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.calibration import calibration_curve
from sklearn.metrics import top_k_accuracy_score

from train.evaluate import metrics


def unit(n, d, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# ---- zero-shot accuracy -------------------------------------------------------------------------

def test_topk_accuracy_matches_sklearn():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 12))
    labels = rng.integers(0, 12, size=300)
    ours = metrics.topk_accuracy(torch.tensor(logits), torch.tensor(labels), (1, 3, 5))
    for k in (1, 3, 5):
        ref = top_k_accuracy_score(labels, logits, k=k, labels=np.arange(12))
        assert ours[k] == pytest.approx(ref, abs=1e-12)


def test_topk_accuracy_hand_case_and_k_above_num_classes():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    acc = metrics.topk_accuracy(logits, labels, (1, 2, 5))
    assert acc[1] == pytest.approx(1 / 3)  # only row 0 right at k=1
    assert acc[2] == pytest.approx(2 / 3)  # row 1's label is second; row 2's is last
    assert acc[5] == 1.0  # k capped at the 3 classes


# ---- retrieval ----------------------------------------------------------------------------------

def naive_recall(sim, relevant, k):
    hits = 0
    for row, rel in zip(sim.tolist(), relevant.tolist()):
        order = sorted(range(len(row)), key=lambda j: -row[j])
        hits += any(rel[j] for j in order[:k])
    return hits / len(sim)


def test_perfect_embeddings_give_recall_one():
    feats = unit(50, 16)
    out = metrics.retrieval_recalls(feats, feats.clone(), torch.arange(50), torch.arange(50))
    assert all(v == 1.0 for v in out.values()), out


def test_recall_hand_case():
    # Query 0: relevant item ranked 1st; query 1: 3rd; query 2: no relevant item at all.
    sim = torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.4, 0.1], [0.3, 0.2, 0.1]])
    relevant = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    assert metrics.recall_at_k(sim, relevant, (1, 2, 3)) == {1: 1 / 3, 2: 1 / 3, 3: 2 / 3}


def test_recall_matches_sort_based_reference_with_groups():
    img, txt = unit(120, 8, 1), unit(40, 8, 2)
    img_group = torch.randint(0, 40, (120,), generator=torch.Generator().manual_seed(3))
    relevant = img_group[:, None] == torch.arange(40)[None, :]
    sim = img @ txt.T
    ours = metrics.recall_at_k(sim, relevant, (1, 5, 10), chunk=7)  # several chunks, ragged last one
    t2i = metrics.recall_at_k(sim.T, relevant.T, (1, 5, 10))
    for k in (1, 5, 10):
        assert ours[k] == pytest.approx(naive_recall(sim, relevant, k))
        assert t2i[k] == pytest.approx(naive_recall(sim.T, relevant.T, k))


# ---- consistency --------------------------------------------------------------------------------

def test_perfect_embeddings_are_fully_consistent():
    classes = unit(5, 32, 4)
    labels = torch.arange(5).repeat(8)
    images = F.normalize(classes[labels] + 0.05 * unit(40, 32, 5), dim=1)
    cross = (images @ classes.T).argmax(1)
    inmodal = metrics.in_modal_predictions(images, labels, 5)
    assert torch.equal(cross, labels) and torch.equal(inmodal, labels)
    assert metrics.consistency(cross, inmodal) == 1.0


def test_in_modal_prediction_is_leave_one_out_prototype():
    images, labels = unit(30, 6, 6), torch.randint(0, 4, (30,), generator=torch.Generator().manual_seed(7))
    expected = []
    for i in range(30):
        sims = []
        for c in range(4):
            others = [j for j in range(30) if labels[j] == c and j != i]
            if not others:
                sims.append(-math.inf)
                continue
            proto = F.normalize(images[others].double().sum(0), dim=0)
            sims.append(float(images[i].double() @ proto))
        expected.append(int(np.argmax(sims)))
    assert metrics.in_modal_predictions(images, labels, 4).tolist() == expected


def test_consistency_counts_agreements():
    assert metrics.consistency(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 0.5


# ---- CyCLIP regularisers ------------------------------------------------------------------------

def test_cyclip_regularizers_equal_naive_n_by_n_form():
    I, T = unit(64, 16, 8), unit(64, 16, 9)
    n = len(I)
    c_in = ((I @ I.T - T @ T.T) ** 2).sum() / n
    M = I @ T.T
    c_cross = ((M - M.T) ** 2).sum() / n
    out = metrics.cyclip_regularizers(I, T)
    assert out["C_in"] == pytest.approx(c_in.item(), rel=1e-5)
    assert out["C_cross"] == pytest.approx(c_cross.item(), rel=1e-5)
    perfect = metrics.cyclip_regularizers(I, I.clone())
    assert perfect["C_in"] == pytest.approx(0, abs=1e-9) and perfect["C_cross"] == pytest.approx(0, abs=1e-9)


# ---- alignment, uniformity, modality gap --------------------------------------------------------

def test_alignment_hand_cases():
    feats = unit(10, 4)
    assert metrics.alignment(feats, feats) == pytest.approx(0.0)
    assert metrics.alignment(feats, -feats) == pytest.approx(4.0)  # ‖x − (−x)‖² = 4 on the unit sphere


def test_uniformity_of_antipodal_pair():
    x = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    assert metrics.uniformity(x) == pytest.approx(-8.0)  # log exp(−2·4)


def test_uniformity_matches_naive_pairwise_mean():
    x = unit(50, 5, 10)
    d2 = torch.cdist(x.double(), x.double()) ** 2
    off = ~torch.eye(50, dtype=torch.bool)
    naive = torch.log(torch.exp(-2 * d2[off]).mean()).item()
    assert metrics.uniformity(x, chunk=16) == pytest.approx(naive, rel=1e-5)
    # The union of two modalities is a plain uniformity of the concatenation.
    assert metrics.uniformity(torch.cat([x, -x])) < metrics.uniformity(torch.cat([x, x]))


def test_modality_gap_hand_case():
    I = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    T = torch.tensor([[-1.0, 0.0], [0.0, -1.0]])
    assert metrics.modality_gap(I, T) == pytest.approx(math.sqrt(2))  # centroids (½,½) and (−½,−½)
    assert metrics.modality_gap(I, I) == 0.0


# ---- calibration --------------------------------------------------------------------------------

def test_constant_confidence_gives_known_ece():
    confidence = torch.full((10,), 0.8)
    correct = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    assert metrics.expected_calibration_error(confidence, correct) == pytest.approx(0.3)  # |0.5 − 0.8|


def test_calibration_bins_and_ece_match_sklearn():
    rng = np.random.default_rng(11)
    conf = np.concatenate([rng.uniform(0.05, 1.0, 2000), np.linspace(0, 1, 16)])  # includes exact bin edges
    correct = (rng.uniform(size=len(conf)) < conf ** 1.5).astype(int)
    bins = metrics.calibration_bins(torch.tensor(conf), torch.tensor(correct), 15)
    prob_true, prob_pred = calibration_curve(correct, conf, n_bins=15, strategy="uniform")
    nonempty = [i for i, c in enumerate(bins["count"]) if c]
    np.testing.assert_allclose([bins["accuracy"][i] for i in nonempty], prob_true, rtol=1e-12)
    np.testing.assert_allclose([bins["confidence"][i] for i in nonempty], prob_pred, rtol=1e-12)
    # ECE from sklearn's per-bin values, weighted by counts binned the way sklearn bins (searchsorted).
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 16)[1:-1], conf), minlength=15)
    ref = (counts[counts > 0] / len(conf) * np.abs(prob_true - prob_pred)).sum()
    assert metrics.expected_calibration_error(torch.tensor(conf), torch.tensor(correct), 15) == pytest.approx(ref)


# ---- effective robustness -----------------------------------------------------------------------

def test_effective_robustness_is_distance_from_baseline_trend():
    base_clean = [0.4, 0.6, 0.8]
    # Baseline models on the line logit(shift) = logit(clean) − 1.
    sig = lambda z: 1 / (1 + math.exp(-z))
    base_shift = [sig(metrics.logit(c) - 1) for c in base_clean]
    on_trend = sig(metrics.logit(0.7) - 1)
    assert metrics.effective_robustness(0.7, on_trend, base_clean, base_shift) == pytest.approx(0, abs=1e-9)
    assert metrics.effective_robustness(0.7, on_trend + 0.05, base_clean, base_shift) == pytest.approx(0.05)
    # One baseline point: slope 1 in logit space through it.
    assert metrics.effective_robustness(0.7, on_trend, [0.6], [base_shift[1]]) == pytest.approx(0, abs=1e-9)


# ----------------------------------------------------------------- k-NN consistency, temperature scaling
def test_knn_votes_and_consistency_by_hand():
    # Reference points on the unit circle at angles (degrees) with labels; query at 0°.
    angles = torch.tensor([10.0, -20.0, 30.0, 40.0, -50.0, 170.0])
    labels = torch.tensor([0, 1, 1, 0, 2, 2])
    ref = torch.stack([torch.cos(torch.deg2rad(angles)), torch.sin(torch.deg2rad(angles))], 1)
    query = torch.tensor([[1.0, 0.0]])
    # Neighbours in order: 10°(0), -20°(1), 30°(1), 40°(0), -50°(2), 170°(2).
    # k=1 → 0; k=3 → votes 0:1, 1:2 → 1; k=4 → 0:2, 1:2 tie → class 0 (its nearest ranks first);
    # k=5 → 0:2, 1:2, 2:1 → 0; k=6 → 0:2, 1:2, 2:2 → 0.
    preds = metrics.knn_predictions(query, ref, labels, ks=(1, 3, 4, 5, 6))
    assert {k: int(v[0]) for k, v in preds.items()} == {1: 0, 3: 1, 4: 0, 5: 0, 6: 0}
    # Consistency against zero-shot predictions 1: agrees only at k=3.
    cons = metrics.knn_consistency(torch.tensor([1]), query, ref, labels, ks=(1, 3, 4))
    assert cons == {1: 0.0, 3: 1.0, 4: 0.0}
    with pytest.raises(ValueError):
        metrics.knn_predictions(query, ref, labels, ks=(7,))


def test_knn_predictions_match_a_naive_loop():
    g = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(40, 5, generator=g), dim=1)
    r = F.normalize(torch.randn(90, 5, generator=g), dim=1)
    lab = torch.randint(0, 4, (90,), generator=g)
    got = metrics.knn_predictions(q, r, lab, ks=(1, 5, 30), chunk=7)
    for i in range(40):
        order = sorted(range(90), key=lambda j: -float(q[i] @ r[j]))
        for k in (1, 5, 30):
            votes = [int(lab[j]) for j in order[:k]]
            best = max(set(votes), key=lambda c: (votes.count(c), -votes.index(c)))
            assert int(got[k][i]) == best


def test_temperature_scaling_minimises_nll_and_nll_by_hand():
    # NLL by hand: logits [2, 0] and label 0 → -log(e²/(e²+1)) = log(1 + e^{-2}).
    assert abs(metrics.nll(torch.tensor([[2.0, 0.0]]), torch.tensor([0])) - math.log1p(math.exp(-2))) < 1e-12
    assert abs(metrics.nll(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), temperature=2.0)
               - math.log1p(math.exp(-1))) < 1e-12
    # Over-confident logits: labels drawn from softmax(z/3), logits given as z → the fitted T is ≈ 3.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 10, generator=g) * 4
    y = torch.multinomial((z / 3).softmax(1), 1, generator=g).squeeze(1)
    t = metrics.fit_temperature(z, y)
    assert abs(t - 3) < 0.15
    grid = torch.linspace(0.5, 8, 751)
    brute = float(grid[torch.tensor([metrics.nll(z, y, float(x)) for x in grid]).argmin()])
    assert abs(t - brute) < 0.02
    before, after = metrics.calibration_metrics(z, y), metrics.calibration_metrics(z, y, t)
    assert after["nll"] < before["nll"] and after["ece"] < 0.3 * before["ece"]


def test_mean_per_class_recall_equals_scikit_learn_balanced_accuracy():
    """CLIP_benchmark computes it with sklearn's balanced_accuracy_score: classes that are only predicted, never
    true, do not count; every class that occurs among the labels weighs the same."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    from train.evaluate.metrics import mean_per_class_recall

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n, c = int(torch.randint(1, 60, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
        labels, pred = torch.randint(0, c, (n,), generator=g), torch.randint(0, c + 2, (n,), generator=g)
        with warnings.catch_warnings():    # sklearn warns about predicted-only classes
            warnings.simplefilter("ignore")
            expected = balanced_accuracy_score(labels.numpy(), pred.numpy())
        assert abs(mean_per_class_recall(pred, labels) - expected) < 1e-12
    # by hand: class 0 has 2 of 3 right, class 2 has 1 of 1; class 1 is predicted but never true
    assert mean_per_class_recall(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 0, 0, 2])) == (2 / 3 + 1) / 2
