"""`sinkfree sinks plot RUN_DIR` and `sinkfree sinks probe --checkpoint X --data Y`."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch


def probe_ids(data: str, tokenizer: Path, num_sequences: int, seq_len: int, bos: bool) -> torch.Tensor:
    """(num_sequences, seq_len) probe ids: consecutive chunks of a plain .txt file, else document starts from
    `TextDataModule(data)`; BOS first unless `bos` is False."""
    # Lazy: data sits below diagnostics in the layer order; only this command-line entry point needs it.
    from sinkfree.data.text import TextDataModule
    from sinkfree.data.tokenizer import load_tokenizer, special_token_ids

    body = seq_len - 1 if bos else seq_len
    if Path(data).suffix == ".txt" and Path(data).is_file():
        tok = load_tokenizer(tokenizer, "--tokenizer")
        ids = tok.encode(Path(data).read_text(encoding="utf-8", errors="replace")).ids
        if len(ids) < num_sequences * body:
            raise ValueError(f"--data {data}: {len(ids)} tokens, fewer than --num-sequences {num_sequences} × "
                             f"{body}; lower --num-sequences or --seq-len")
        rows = torch.tensor(ids[: num_sequences * body]).view(num_sequences, body)
        if bos:
            rows = torch.cat([torch.full((num_sequences, 1), special_token_ids(tok)["bos"]), rows], 1)
        return rows
    dm = TextDataModule(data=data, tokenizer=str(tokenizer), seq_len=seq_len, progress=False)
    return dm.probe_batch(num_sequences, seq_len) if bos else dm.probe_batch(num_sequences, seq_len + 1)[:, 1:]


def _run_config_tokenizer(checkpoint: Path, out: Path) -> Path | None:
    """The tokenizer a run trained on: its config.yaml's `data` rebuilt (cached tokenizers load, others
    retrain deterministically), saved to OUT/tokenizer.json. None when there is no run config."""
    import yaml

    from sinkfree.data.text import TextDataModule

    config = next((d / "config.yaml" for d in (checkpoint.parent, checkpoint.parent.parent)
                   if (d / "config.yaml").is_file()), None)
    if config is None:
        return None
    data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    args = dict(data.get("init_args", data))
    args.pop("prompts", None)
    out.mkdir(parents=True, exist_ok=True)
    TextDataModule(**{**args, "progress": False}).tokenizer.save(str(out / "tokenizer.json"))
    return out / "tokenizer.json"


def _tokenizer_path(checkpoint: str, given: str | None, out: Path) -> Path:
    """--tokenizer, else tokenizer.json beside the checkpoint or in its run folder, else the run config's."""
    if given:
        return Path(given)
    from sinkfree.checkpoints.hf import open_checkpoint

    file = open_checkpoint(checkpoint).tokenizer_files.get("tokenizer.json")
    if isinstance(file, Path):
        return file
    out.mkdir(parents=True, exist_ok=True)
    if file is not None:  # embedded in the checkpoint (GGUF): write it out
        (out / "tokenizer.json").write_text(file)
        return out / "tokenizer.json"
    found = _run_config_tokenizer(Path(checkpoint), out)
    if found is None:
        raise FileNotFoundError(f"no tokenizer.json beside {checkpoint}, in its run folder, or from its run's "
                                "config.yaml; pass --tokenizer")
    return found


def _dit_checkpoint(checkpoint: str) -> dict | None:
    """The loaded Lightning checkpoint when it holds a DiT (`hyper_parameters["arch"]` with `patch_size`)."""
    path = Path(checkpoint)
    if path.suffix != ".ckpt" or not path.is_file():
        return None
    from sinkfree.checkpoints.source import _torch_load

    ckpt = _torch_load(path)
    arch = (ckpt.get("hyper_parameters") or {}).get("arch")
    return ckpt if isinstance(arch, dict) and "patch_size" in arch else None


def _dit_probe(args, ckpt: dict):
    """(model, probe inputs, summary fields) of a DiT checkpoint: clips from its run's config.yaml `data`
    (`--data` replaces the path of a FolderDataModule), noised by `RectifiedFlow.probe_inputs`."""
    import importlib

    import yaml

    from sinkfree.models.dit import DiTConfig
    from sinkfree.tasks.flow import PROBE_T, RectifiedFlow

    checkpoint = Path(args.checkpoint)
    task = RectifiedFlow(arch=DiTConfig(**ckpt["hyper_parameters"]["arch"]))
    task.configure_model()
    state = {k[len("model."):].replace("_orig_mod.", ""): v for k, v in ckpt["state_dict"].items()
             if k.startswith("model.")}
    task.model.load_state_dict(state)
    config = next((d / "config.yaml" for d in (checkpoint.parent, checkpoint.parent.parent)
                   if (d / "config.yaml").is_file()), None)
    data = (yaml.safe_load(config.read_text()) or {}).get("data") if config is not None else None
    if not isinstance(data, dict) or "class_path" not in data:
        raise FileNotFoundError(f"a DiT probe takes its clips from the run's config.yaml `data`; none beside "
                                f"{checkpoint} or in its run folder")
    module, _, name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    init = dict(data.get("init_args") or {})
    if args.data is not None:
        if "path" not in init:
            raise ValueError(f"--data {args.data}: a DiT probe takes a folder only for a FolderDataModule run; "
                             f"this run uses {data['class_path']} (leave --data out)")
        init["path"] = args.data
    batch = cls(**init).probe_batch(args.num_sequences)
    inputs = task.probe_inputs(batch)
    grid = task.model.token_grid(inputs["x"].shape)
    extra = {"kind": "dit", "num_sequences": int(inputs["x"].shape[0]), "seq_len": grid[0] * grid[1] * grid[2],
             "token_grid": list(grid), "t": PROBE_T, "data": data["class_path"]}
    return task.model, inputs, extra


def run_probe(args) -> list[Path]:
    """Load the checkpoint, probe it, write stats.csv, last_probe.npz, summary.json and the plots."""
    from sinkfree.diagnostics.monitor import append_rows, default_map_layers, save_arrays, scalar_name
    from sinkfree.diagnostics.plots import plot_run
    from sinkfree.diagnostics.probe import SinkStats, inputs_to, probe_model

    out = Path(args.out)
    stats_path = out / "stats.csv"
    if stats_path.exists():
        raise FileExistsError(f"{stats_path} exists; choose another --out (rows would mix two probes)")
    dit = _dit_checkpoint(args.checkpoint)
    if dit is not None:
        model, ids, extra = _dit_probe(args, dit)
        del dit
        model, ids = model.to(args.device), inputs_to(ids, args.device)
    else:
        from sinkfree.checkpoints.hf import load_pretrained

        if args.data is None:
            raise ValueError("--data is required for a language model (the probe text)")
        model = load_pretrained(args.checkpoint).to(args.device)
        ids = probe_ids(args.data, _tokenizer_path(args.checkpoint, args.tokenizer, out), args.num_sequences,
                        args.seq_len, not args.no_bos).to(args.device)
        extra = {"data": args.data, "num_sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                 "bos": not args.no_bos}
    maps = args.layers_for_maps if args.layers_for_maps is not None else default_map_layers(len(model.layers))
    probe, short = probe_model(model, ids, maps)
    stats = SinkStats(probe, map_layers=maps).to(args.device)
    stats.update(probe, short)
    results = stats.compute()
    rows = stats.rows(results, step=0)
    append_rows(stats_path, rows)
    save_arrays(out / "last_probe.npz", stats.arrays(results, step=0))
    summary = {"checkpoint": str(args.checkpoint), **extra,
               "metrics": {name: r.value for r in rows if (name := scalar_name(r)) is not None}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return [stats_path, out / "last_probe.npz", out / "summary.json"] + plot_run(out, out / "plots")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sinkfree sinks", description="Attention- and residual-sink diagnostics.")
    sub = p.add_subparsers(dest="command", required=True)
    plot = sub.add_parser("plot", help="export PNG/SVG/CSV figures from a run's sinks/stats.csv",
                          description="Write every sink figure (PNG, SVG and the CSV it plots) of a run folder.")
    plot.add_argument("run_dir", metavar="RUN_DIR",
                      help="the run folder holding sinks/stats.csv (written by SinkMonitor), or a probe --out folder")
    plot.add_argument("--out", default=None, help="folder for the figures (default: RUN_DIR/sinks/plots)")

    probe = sub.add_parser("probe", help="measure the sinks of any checkpoint on a probe batch",
                           description="Load a checkpoint, run the sink probe on text, and write stats.csv, "
                                       "last_probe.npz, summary.json and the figures.")
    probe.add_argument("--checkpoint", required=True,
                       help="a sinkfree .ckpt, a sinkfree or HF folder, .safetensors or .gguf")
    probe.add_argument("--data", default=None,
                       help="LLMs (required): a plain .txt file (cut into consecutive chunks), or what data.data "
                            "takes: files/globs (.txt = one document each, .json/.jsonl/.parquet) or a datasets "
                            "name. DiT .ckpt: optional; the clips come from the run's config.yaml data (the "
                            "first validation items, noised at t = 0.5), --data replaces a FolderDataModule's path")
    probe.add_argument("--tokenizer", default=None,
                       help="tokenizer.json (default: the one beside the checkpoint or in its run folder)")
    probe.add_argument("--num-sequences", type=int, default=8, help="probe sequences (default 8)")
    probe.add_argument("--seq-len", type=int, default=512,
                       help="tokens per probe sequence (default 512; DiTs: ignored, the clips keep their shape)")
    probe.add_argument("--no-bos", action="store_true", help="do not put BOS first (the first text token "
                       "becomes position 0)")
    probe.add_argument("--layers-for-maps", type=int, nargs="+", default=None,
                       help="layers whose head-averaged attention maps are saved (default: 4 evenly spaced)")
    probe.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="torch device for the probe (default: cuda if available, else cpu)")
    probe.add_argument("--out", default="sinks_probe", help="output folder (default: ./sinks_probe)")
    return p


def sinks_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sinkfree sinks ...`; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "probe" and (args.num_sequences < 1 or args.seq_len < 2):
        print("sinkfree sinks probe: --num-sequences must be >= 1 and --seq-len >= 2", file=sys.stderr)
        return 2
    try:
        if args.command == "plot":
            from sinkfree.diagnostics.plots import plot_run

            files = plot_run(args.run_dir, args.out)
        else:
            files = run_probe(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"sinkfree sinks {args.command}: {e}", file=sys.stderr)
        return 1
    for f in files:
        print(f)
    return 0
