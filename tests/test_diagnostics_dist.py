"""Two gloo processes, each with part of the probe, give the numbers of one process over the union."""
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sinkfree.diagnostics.probe import LayerProbe, SinkStats

L, B, S, C, H, HKV, D = 2, 4, 12, 16, 2, 1, 8


def synthetic_probe(seed: int = 0) -> list[LayerProbe]:
    g = torch.Generator().manual_seed(seed)
    probes = []
    for layer in range(L):
        probs = torch.rand(B, H, S, S, generator=g).tril()
        probs[:, :, :, 0] += torch.rand(B, H, 1, generator=g) * 4  # a mix of sink and non-sink heads
        probs = probs / probs.sum(-1, keepdim=True)
        resid = torch.randn(B, S, C, generator=g) * 0.05
        resid[:, 0, 3] = 200.0 + layer  # massive on every first token
        resid[1, 0, 9] = 150.0  # ... and one more in sequence 1 only
        resid[:, 1:, 11] += 2.0  # a residual-sink dim
        probes.append(LayerProbe(
            first_token=probs[..., 0].mean(-1), max_key=probs.mean(-2).amax(-1),
            sink_mass=torch.rand(B, H, generator=g), value_ratio=torch.rand(B, HKV, generator=g),
            gate=torch.rand(B, S, H, D, generator=g), attn_map=probs.mean(1), resid=resid,
            norm_weight=torch.linspace(0.5, 1.5, C)))
    return probes


def part(probes, rows):
    return [LayerProbe(**{k: (v[rows] if torch.is_tensor(v) and k != "norm_weight" else v) for k, v in vars(p).items()})
            for p in probes]


def stats_rows(probes, short):
    stats = SinkStats(probes, map_layers=[1])
    stats.update(probes, short)
    results = stats.compute()
    arrays = stats.arrays(results, step=5)
    return [list(r) for r in stats.rows(results, step=5)], {k: v.tolist() for k, v in arrays.items() if k != "step"}


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        full = synthetic_probe()
        rows = slice(0, 3) if rank == 0 else slice(3, 4)  # uneven: exercises the padded gather
        mine = part(full, rows)
        short = part(synthetic_probe(seed=1), rows)
        result = stats_rows(mine, short)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(a, b):
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= 1e-6 * max(1.0, abs(a))
    return a == b


def test_two_gloo_processes_equal_one_process_over_the_union(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    expected_rows, expected_arrays = stats_rows(synthetic_probe(), synthetic_probe(seed=1))
    for rank in range(2):
        rows, arrays = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [r[:4] for r in rows] == [r[:4] for r in expected_rows]  # same (step, layer, head, metric)
        assert close(rows, expected_rows)
        assert arrays.keys() == expected_arrays.keys()
        assert all(close(arrays[k], expected_arrays[k]) for k in arrays)
    get = {tuple(r[1:4]): r[4] for r in expected_rows}
    assert get[(0, 3, "massive_dim")] == 4 and get[(0, 9, "massive_dim")] == 1  # one sequence only
    assert get[(1, 11, "resid_sink_dim_weight")] == float(torch.linspace(0.5, 1.5, C)[11])
    # a one-process answer that only saw one rank's data differs: the test can tell
    partial, _ = stats_rows(part(synthetic_probe(), slice(0, 3)), part(synthetic_probe(1), slice(0, 3)))
    assert not close(partial, expected_rows)
