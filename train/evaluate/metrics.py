"""Evaluation metrics on embeddings and logits (docs/METHODS.md §4). Pure functions: tensors in, numbers out.

Conventions: image features ``I`` (n×d) and text features ``T`` (m×d) are L2-normalised rows; row i of
``I`` and row i of ``T`` are a positive pair where a function needs pairs. Everything runs under
``torch.no_grad`` and reduces in float64 where sums of many terms can lose precision.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Sequence

import torch
import torch.nn.functional as F


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> Dict[int, float]:
    """Fraction of rows whose true label is among the k largest logits, for each k (k capped at #classes).

    Ties are broken by ``torch.topk``'s order, as scikit-learn's ``top_k_accuracy_score`` does not
    define them either; with continuous logits ties do not occur.
    """
    num_classes = logits.shape[1]
    out = {}
    for k in ks:
        top = logits.topk(min(k, num_classes), dim=1).indices
        out[k] = (top == labels[:, None]).any(dim=1).double().mean().item()
    return out


def benchmark_recalls(image_features: torch.Tensor, text_features: torch.Tensor, text_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Recall@k both ways for a gallery of several texts per image, as CLIP_benchmark computes it
    (``metrics/zeroshot_retrieval.py``): scores S = T Iᵀ (texts × images); text→image R@k = the share of texts whose
    image is among ``torch.topk(S[t], k)``; image→text R@k = the share of images with one of their texts among
    ``torch.topk(Sᵀ[i], k)``. Ties (identical captions have identical embeddings) fall as ``torch.topk`` orders
    them, as in CLIP_benchmark, not in the query's favour as ``recall_at_k`` counts them.

    ``image_features`` (I, d) and ``text_features`` (T, d) L2-normalised; ``text_image`` (T,): each text's image.
    """
    scores = text_features @ image_features.T
    images = torch.arange(len(image_features))
    out = {}
    for k in ks:
        k_img, k_txt = min(k, scores.shape[1]), min(k, scores.shape[0])
        t2i = (scores.topk(k_img, dim=1).indices == text_image[:, None]).any(dim=1)
        i2t = (text_image[scores.T.topk(k_txt, dim=1).indices] == images[:, None]).any(dim=1)
        out[f"i2t_R@{k}"], out[f"t2i_R@{k}"] = i2t.double().mean().item(), t2i.double().mean().item()
    return {key: out[key] for key in sorted(out, key=lambda name: (name[:3], int(name.split("@")[1])))}


def mean_per_class_recall(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Recall of each class that occurs in ``labels``, averaged over those classes (balanced accuracy).

    ``pred``, ``labels``: (N,) class indices. CLIP_benchmark's third classification metric, computed there with
    scikit-learn's ``balanced_accuracy_score`` (classes only predicted, never true, do not count).
    """
    classes, counts = labels.unique(return_counts=True)
    hits = torch.zeros(int(labels.max()) + 1, dtype=torch.float64).index_add_(
        0, labels, (pred == labels).double())[classes]
    return (hits / counts).mean().item()


def recall_at_k(similarity: torch.Tensor, relevant: torch.Tensor, ks: Iterable[int] = (1, 5, 10),
                chunk: int = 1024) -> Dict[int, float]:
    """Recall@k for queries (rows) against a gallery (columns).

    ``relevant`` is a boolean matrix of the same shape: which gallery items answer each query. A query
    counts as a hit at k when at least one relevant item is among its k most similar (the usual
    definition in CLIP retrieval papers, not the fraction of all relevant items found).
    """
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and relevant {tuple(relevant.shape)} differ")
    # Rank of the best relevant item = how many gallery items score strictly higher. No sort needed,
    # so 10,000 × 10,000 fits in chunks. Ties with the best relevant item count in its favour.
    ranks = []
    for start in range(0, len(similarity), chunk):
        sim, rel = similarity[start:start + chunk], relevant[start:start + chunk]
        best = sim.masked_fill(~rel, -math.inf).max(dim=1).values
        rank = (sim > best[:, None]).sum(dim=1)
        ranks.append(torch.where(rel.any(dim=1), rank, torch.full_like(rank, similarity.shape[1])))
    rank = torch.cat(ranks)
    return {k: (rank < k).double().mean().item() for k in ks}


def retrieval_recalls(image_features: torch.Tensor, text_features: torch.Tensor, image_group: torch.Tensor,
                      text_group: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Image→text and text→image recall@k, where an image and a text are relevant iff their group ids match.

    Group ids encode the relevance definition chosen by the caller: the sample index (instance level),
    the index of the distinct caption string (duplicates merged), or the class label.
    """
    relevant = image_group[:, None] == text_group[None, :]
    sim = image_features @ text_features.T
    i2t = recall_at_k(sim, relevant, ks)
    t2i = recall_at_k(sim.T, relevant.T, ks)
    out = {f"i2t_R@{k}": v for k, v in i2t.items()}
    out.update({f"t2i_R@{k}": v for k, v in t2i.items()})
    return out


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Normalised mean embedding per class (zero rows for classes with no sample)."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype).index_add_(0, labels, features)
    return F.normalize(sums, dim=1)


def in_modal_predictions(image_features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class predicted from images only: nearest leave-one-out class prototype.

    The prototype of an image's own class excludes that image, so the prediction never sees its own
    label through itself (otherwise a class of one would always be predicted correctly).
    """
    feats = image_features.double()
    sums = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64).index_add_(0, labels, feats)
    sims = feats @ sums.T  # (n, C): ⟨x, Σ_c⟩, then fix the own-class column below
    own_sum = sums[labels] - feats
    sims[torch.arange(len(feats)), labels] = (feats * own_sum).sum(1)
    norms = sums.norm(dim=1).expand_as(sims).clone()
    norms[torch.arange(len(feats)), labels] = own_sum.norm(dim=1)
    # Cosine to each prototype; a class whose prototype is empty can never be predicted.
    cos = torch.where(norms > 0, sims / norms.clamp_min(1e-12), torch.full_like(sims, -math.inf))
    return cos.argmax(dim=1)


def consistency(cross_modal_pred: torch.Tensor, in_modal_pred: torch.Tensor) -> float:
    """CyCLIP consistency: fraction of samples whose cross-modal and in-modal predictions agree."""
    return (cross_modal_pred == in_modal_pred).double().mean().item()


def cyclip_regularizers(image_features: torch.Tensor, text_features: torch.Tensor) -> Dict[str, float]:
    """C_in = ‖IIᵀ − TTᵀ‖²_F / N and C_cross = ‖M − Mᵀ‖²_F / N (M = ITᵀ), via d×d Gram matrices.

    The Gram form (docs/METHODS.md §2) needs O(d²) memory instead of N×N; float64 because the terms are
    differences of large sums.
    """
    I, T = image_features.double(), text_features.double()
    n = len(I)
    g_ii, g_tt, g_it = I.T @ I, T.T @ T, I.T @ T
    c_in = (g_ii.square().sum() - 2 * g_it.square().sum() + g_tt.square().sum()) / n
    c_cross = (2 * (g_ii * g_tt).sum() - 2 * (g_it * g_it.T).sum()) / n
    # Exact arithmetic gives values ≥ 0; rounding can leave a tiny negative residue.
    return {"C_in": max(c_in.item(), 0.0), "C_cross": max(c_cross.item(), 0.0)}


def alignment(image_features: torch.Tensor, text_features: torch.Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola alignment: E‖I_i − T_i‖^α over positive pairs (lower is better)."""
    return (image_features.double() - text_features.double()).norm(dim=1).pow(alpha).mean().item()


def uniformity(features: torch.Tensor, t: float = 2.0, chunk: int = 2048) -> float:
    """Wang & Isola uniformity: log E_{i≠j} exp(−t‖x_i − x_j‖²) (lower is better).

    Computed as a log-sum-exp over row chunks, so n = 20,000 never holds an n×n matrix and the
    exponentials of large distances do not underflow to log(0).
    """
    # float32 distances and per-chunk log-sum-exp (stable in float32; ~1e-6 relative error) run several
    # times faster than float64 at n = 20,000; only the chunk totals are combined in float64.
    x = features.float()
    n = len(x)
    if n < 2:
        raise ValueError("uniformity needs at least two points")
    sq = x.square().sum(1)
    partial = []
    for start in range(0, n, chunk):
        rows = x[start:start + chunk]
        d2 = (sq[start:start + chunk, None] + sq[None, :] - 2 * rows @ x.T).clamp_min(0)
        logits = -t * d2
        idx = torch.arange(len(rows))
        logits[idx, start + idx] = -math.inf  # exclude i == j
        partial.append(torch.logsumexp(logits.flatten(), 0).double())
    return (torch.logsumexp(torch.stack(partial), 0) - math.log(n * (n - 1))).item()


def modality_gap(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """Distance between the modality centroids: ‖mean(I) − mean(T)‖."""
    return (image_features.double().mean(0) - text_features.double().mean(0)).norm().item()


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> Dict[str, list]:
    """Equal-width confidence bins (lo, hi] (the first also takes 0): count, mean confidence, accuracy.

    The bin convention matches ``sklearn.calibration.calibration_curve(strategy="uniform")``.
    Empty bins report NaN mean confidence and accuracy.
    """
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    conf = confidence.double()
    idx = torch.bucketize(conf, edges[1:-1], right=False)
    count = torch.bincount(idx, minlength=n_bins).double()
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct.double())
    safe = count.clamp_min(1)
    nan = torch.full_like(count, math.nan)
    return {"edges": edges.tolist(), "count": count.long().tolist(),
            "confidence": torch.where(count > 0, conf_sum / safe, nan).tolist(),
            "accuracy": torch.where(count > 0, acc_sum / safe, nan).tolist()}


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """ECE = Σ_b (n_b / N) · |accuracy_b − confidence_b| over equal-width bins (Guo et al., 2017)."""
    bins = calibration_bins(confidence, correct, n_bins)
    n = len(confidence)
    return sum(c / n * abs(a - p) for c, a, p in zip(bins["count"], bins["accuracy"], bins["confidence"]) if c)


def logit(p: float, eps: float = 1e-4) -> float:
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))


def effective_robustness(clean: float, shifted: float, baseline_clean: Sequence[float],
                         baseline_shifted: Sequence[float]) -> float:
    """Shifted accuracy above what the baseline trend predicts from the clean accuracy (Taori et al., 2020).

    The trend is the least-squares line logit(shifted) = a·logit(clean) + b through the baseline
    models' points. With a single baseline point (or all at one clean accuracy) the slope is taken
    as 1: the baseline's logit-space drop is assumed to carry over.
    """
    xs = [logit(c) for c in baseline_clean]
    ys = [logit(s) for s in baseline_shifted]
    if not xs:
        raise ValueError("effective robustness needs at least one baseline point")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 1e-12 else 1.0
    predicted = my + slope * (logit(clean) - mx)
    return shifted - 1 / (1 + math.exp(-predicted))


# ----------------------------------------------------------------- the papers' own definitions
CONSISTENCY_KS = (1, 3, 5, 10, 30)


def knn_predictions(query: torch.Tensor, reference: torch.Tensor, reference_labels: torch.Tensor,
                    ks: Sequence[int] = CONSISTENCY_KS, chunk: int = 2048) -> Dict[int, torch.Tensor]:
    """In-modal class predictions: majority vote of the k most cosine-similar reference rows, for each k.

    CyCLIP (Goel et al., 2022, §5.2) takes the reference set to be the *training* image embeddings.
    ``query`` (n×d) and ``reference`` (m×d) are L2-normalised; returns {k: (n,) long}. A tied vote goes
    to the tied class whose nearest member ranks first (so k=1 is the nearest neighbour's label).
    """
    if max(ks) > len(reference):
        raise ValueError(f"k={max(ks)} exceeds the {len(reference)} reference embeddings")
    num_classes = int(reference_labels.max()) + 1
    kmax = max(ks)
    out: Dict[int, List[torch.Tensor]] = {k: [] for k in ks}
    ref = reference.float()
    for start in range(0, len(query), chunk):
        nearest = (query[start:start + chunk].float() @ ref.T).topk(kmax, dim=1).indices    # sorted, best first
        votes_of = reference_labels[nearest]                                              # (b, kmax)
        for k in ks:
            counts = F.one_hot(votes_of[:, :k], num_classes).sum(1).double()              # (b, C)
            # first rank at which each class appears (k if never): fewer is better on a tie
            ranks = torch.arange(k, dtype=torch.float64).expand(len(votes_of), k)
            first = torch.full_like(counts, float(k)).scatter_reduce(1, votes_of[:, :k], ranks, "amin")
            out[k].append((counts * (k + 1) - first).argmax(1))
    return {k: torch.cat(v) for k, v in out.items()}


def knn_consistency(cross_modal_pred: torch.Tensor, query: torch.Tensor, reference: torch.Tensor,
                    reference_labels: torch.Tensor, ks: Sequence[int] = CONSISTENCY_KS) -> Dict[int, float]:
    """CyCLIP consistency: fraction of test images whose zero-shot (image→class text) prediction equals
    the k-NN vote over training image embeddings, for each k (Goel et al., 2022)."""
    return {k: consistency(cross_modal_pred, pred)
            for k, pred in knn_predictions(query, reference, reference_labels, ks).items()}


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature) (nats)."""
    return F.cross_entropy(logits.double() / temperature, labels).item()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, lo: float = 1e-2, hi: float = 1e2,
                    iters: int = 100) -> float:
    """Temperature scaling (Guo et al., 2017): the T > 0 minimising NLL(softmax(logits / T)) on held-out data.

    NLL is convex in β = 1/T (log-sum-exp of a linear function minus a linear one), hence unimodal in
    log β: a golden-section search over log T ∈ [log lo, log hi] finds the minimum to ~1e-20 relative
    width in 100 iterations, with no optimizer state or learning rate to choose.
    """
    z, y = logits.double(), labels
    f = lambda log_t: F.cross_entropy(z / math.exp(log_t), y).item()
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return math.exp((a + b) / 2)


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                        n_bins: int = 15) -> Dict[str, float]:
    """ECE (``n_bins`` equal-width bins) and NLL of softmax(logits / temperature)."""
    probs = (logits.double() / temperature).softmax(dim=1)
    confidence, pred = probs.max(dim=1)
    return {"ece": expected_calibration_error(confidence, pred == labels, n_bins),
            "nll": nll(logits, labels, temperature)}
