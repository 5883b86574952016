"""LightningCLI for `sinkfree fit|validate|test|predict`: recipes, run folders, resume and clear errors."""

from __future__ import annotations

import argparse
import glob
import importlib
import logging
import os
import re
import sys
import tempfile
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

log = logging.getLogger(__name__)

# Errors a user causes with a config value: shown as one line naming the option, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def _latest_resumable(run_root: str) -> tuple[str, str] | None:
    """(version folder name, last.ckpt path) of the newest version under `run_root` holding a last.ckpt."""
    found = []
    for ckpt in glob.glob(os.path.join(run_root, "*", "checkpoints", "last.ckpt")):
        version = os.path.basename(os.path.dirname(os.path.dirname(ckpt)))
        m = re.fullmatch(r"version_(\d+)", version)
        found.append((int(m.group(1)) if m else -1, os.path.getmtime(ckpt), version, ckpt))
    if not found:
        return None
    _, _, version, ckpt = max(found)
    return version, ckpt


def root_message(err: BaseException) -> str:
    """First line of the innermost cause: jsonargparse wraps our one-line errors in Union reports."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


class SinkfreeCLI(LightningCLI):
    """LightningCLI with sinkfree's run-folder conventions."""

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        if cfg is None:
            return
        self._check_run_folder(cfg)
        self._tokenizer_from_init(cfg)
        if cfg.get("ckpt_path") == "last":
            self._resume_latest(cfg)

    def _logger_init(self, cfg: Namespace) -> Any:
        logger = cfg.get("trainer", {}).get("logger")
        if isinstance(logger, list):
            logger = logger[0] if logger else None
        if isinstance(logger, Namespace) and "init_args" in logger:
            return logger.init_args
        return None

    def _check_run_folder(self, cfg: Namespace) -> None:
        init = self._logger_init(cfg)
        save_dir = init.get("save_dir") if init is not None else cfg.trainer.get("default_root_dir")
        if not save_dir:
            return
        try:  # really try: permission bits say little when running as root
            os.makedirs(save_dir, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=save_dir):
                pass
        except OSError as err:
            self.parser.error(
                f"trainer.logger save_dir={save_dir!r} is not a writable folder ({err.strerror}); "
                "choose a run folder you can write, e.g. --trainer.logger.init_args.save_dir runs"
            )

    def _tokenizer_from_init(self, cfg: Namespace) -> None:
        """`--model.init_from X` without `data.tokenizer`: use X's tokenizer.json (a folder's, or the one beside
        a file), since the token ids must match the checkpoint's embeddings. An explicit tokenizer wins."""
        model, data = cfg.get("model"), cfg.get("data")
        model_args = model.get("init_args") if isinstance(model, Namespace) else None
        data_args = data.get("init_args") if isinstance(data, Namespace) else None
        init_from = model_args.get("init_from") if model_args is not None else None
        if not init_from or data_args is None or "tokenizer" not in data_args or data_args.get("tokenizer"):
            return
        path = os.path.expanduser(str(init_from))
        tok = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "tokenizer.json")
        if os.path.isfile(tok):
            data_args.tokenizer = tok
            log.info("data.tokenizer not set: using %s from model.init_from", tok)

    def _resume_latest(self, cfg: Namespace) -> None:
        """Make `--ckpt_path last` continue the newest run folder of this recipe, in that same folder."""
        init = self._logger_init(cfg)
        if init is None or not init.get("save_dir"):
            return  # Lightning's own lookup through the ModelCheckpoint folder applies
        root = os.path.join(init.save_dir, init.get("name") or "")
        latest = _latest_resumable(root)
        if latest is None:
            self.parser.error(f"--ckpt_path last: no checkpoints/last.ckpt under {root}/*/; nothing to resume")
        version, ckpt = latest
        init.version = version
        cfg.ckpt_path = ckpt

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except USER_ERRORS as err:
            self.parser.error(root_message(err))


def _component_help(argv: list[str]) -> str:
    """Help for the model and data classes of the recipe in `argv` (LightningCLI shows only their names)."""
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    model_cls, data_cls = "sinkfree.tasks.CausalLM", "sinkfree.data.TextDataModule"
    if "--config" in argv or "-c" in argv:
        i = argv.index("--config") if "--config" in argv else argv.index("-c")
        try:
            import yaml

            with open(argv[i + 1]) as f:
                cfg = yaml.safe_load(f) or {}
            model_cls = (cfg.get("model") or {}).get("class_path", model_cls)
            data_cls = (cfg.get("data") or {}).get("class_path", data_cls)
        except (OSError, IndexError, yaml.YAMLError):
            pass
    parts = []
    for key, path in (("model", model_cls), ("data", data_cls)):
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        p = ArgumentParser(prog=f"sinkfree {argv[0]}", add_help=False, usage=argparse.SUPPRESS)
        p.add_class_arguments(cls, key, fail_untyped=False)
        parts.append(f"\n{key} options ({path}; set them in the recipe under `{key}.init_args`, or as "
                     f"--{key}.NAME VALUE):\n" + p.format_help())
        arch = _dataclass_arg(cls, "arch")
        if arch is not None:
            p = ArgumentParser(prog=f"sinkfree {argv[0]}", add_help=False, usage=argparse.SUPPRESS)
            p.add_class_arguments(arch, f"{key}.arch")
            parts.append(f"\n{key}.arch options ({arch.__name__}: the architecture and its sink switches):\n"
                         + p.format_help())
    return "".join(parts)


def _dataclass_arg(cls: type, name: str) -> type | None:
    """The dataclass type of `cls.__init__`'s argument `name` (unwrapping Optional), if any."""
    import dataclasses
    import typing

    try:
        hint = typing.get_type_hints(cls.__init__).get(name)
    except (NameError, TypeError):
        return None
    for t in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(t):
            return t
    return None


def run_lightning_cli(argv: list[str]) -> None:
    """Run one LightningCLI verb (`fit`, `validate`, `test`, `predict`) with `argv` (verb first)."""
    sys.argv = sys.argv[:1]  # the verb's options come through `args`; LightningCLI warns when both are set
    pkg = logging.getLogger("sinkfree")  # show our info lines (tokenizer default, sink calibration, retrofit)
    if not pkg.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("sinkfree: %(message)s"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)
    if "-h" in argv or "--help" in argv:
        try:
            SinkfreeCLI(args=argv, subclass_mode_model=True, subclass_mode_data=True,
                        auto_configure_optimizers=False, parser_kwargs={"prog": "sinkfree"})
        except SystemExit:
            print(_component_help(argv))
            raise
    try:
        SinkfreeCLI(
            args=argv,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"prog": "sinkfree"},
        )
    except USER_ERRORS as err:
        # Raised while the run sets itself up (a data path, a tokenizer that does not fit the model, ...).
        if os.environ.get("SINKFREE_DEBUG"):
            raise
        sys.stderr.write(f"sinkfree {argv[0]}: error: {root_message(err)}\n(set SINKFREE_DEBUG=1 for the traceback)\n")
        sys.exit(2)
