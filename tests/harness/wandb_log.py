"""Reads what wandb wrote offline (RUN_DIR/wandb/offline-run-*/run-ID.wandb), to check it in the tests.

wandb >= 0.2x has no public reader of its transaction log (the Python DataStore went with the Go core), and
`wandb sync` needs a server. The file is a LevelDB-style log (32 KiB blocks of records, each a 7-byte header:
crc32 4, length 2, type 1 = full/first/middle/last) after a 7-byte ":W&B" header; each record is a
``wandb_internal_pb2.Record`` protobuf (wandb's own classes decode it). Test-only code: ~30 lines.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, List

BLOCK = 32768
HEADER = 7


def _chunks(data: bytes) -> List[bytes]:
    assert data[:4] == b":W&B", f"not a wandb transaction log (starts {data[:8]!r})"
    pos, out, partial = HEADER, [], b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:    # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:    # zero padding up to the block's end
            pos += left
            continue
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            out.append(partial + chunk)
            partial = b""
    return out


def read_offline_run(path: Path) -> Dict[str, object]:
    """{"run_id", "project", "history": [{key: value}, ...]} of one run-ID.wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb

    run: Dict[str, object] = {"history": []}
    for raw in _chunks(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(run_id=record.run.run_id, project=record.run.project)
        elif kind == "history":
            run["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
    return run


def offline_runs(run_dir: Path) -> List[Dict[str, object]]:
    """Every offline wandb run under RUN_DIR/wandb, oldest first."""
    return [read_offline_run(p) for p in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))]
