"""LightningCLI for `sinkfree fit|validate|test|predict`: recipes, run folders, resume and clear errors."""

from __future__ import annotations

import glob
import os
import re
import sys
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

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


class SinkfreeCLI(LightningCLI):
    """LightningCLI with sinkfree's run-folder conventions."""

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        if cfg is None:
            return
        self._check_run_folder(cfg)
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
        probe = os.path.abspath(save_dir)
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
            self.parser.error(
                f"trainer.logger save_dir={save_dir!r} is not writable ({probe} is not a writable folder); "
                "choose a run folder you can write, e.g. --trainer.logger.init_args.save_dir runs"
            )

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
            self.parser.error(str(err).splitlines()[0] if str(err) else repr(err))


def run_lightning_cli(argv: list[str]) -> None:
    """Run one LightningCLI verb (`fit`, `validate`, `test`, `predict`) with `argv` (verb first)."""
    sys.argv = sys.argv[:1]  # the verb's options come through `args`; LightningCLI warns when both are set
    try:
        SinkfreeCLI(
            args=argv,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    except USER_ERRORS as err:
        # Raised while the run sets itself up (a data path, a tokenizer that does not fit the model, ...).
        if os.environ.get("SINKFREE_DEBUG"):
            raise
        msg = str(err).splitlines()[0] if str(err) else repr(err)
        sys.stderr.write(f"sinkfree {argv[0]}: error: {msg}\n(set SINKFREE_DEBUG=1 for the traceback)\n")
        sys.exit(2)
