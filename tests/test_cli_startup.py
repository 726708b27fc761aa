"""`unialign --help` and argument/config errors answer without importing torch or Lightning
(seconds on a small machine): the command line imports them inside the commands."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from unialign.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = [m for m in ("torch", "lightning", "transformers", "timm", "numpy") if m in sys.modules]
print("HEAVY", heavy)
"""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["train", "--config", "missing.yaml",
                                                                     "--output", "out"], ["eval", "--help"]])
def test_cli_answers_without_heavy_imports(argv, tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    line = next(x for x in out.stdout.splitlines() if x.startswith("HEAVY"))
    assert line == "HEAVY []", (line, out.stderr[-500:])


def test_a_damaged_checkpoint_is_one_line(tmp_path, capsys):
    """The command line prints the checkpoint reader's one-line error, not a traceback."""
    from unialign.cli import main

    bad = tmp_path / "model.ckpt"
    bad.write_text("not a checkpoint\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", "--checkpoint", str(bad), "--texts", str(bad), "--output", str(tmp_path / "e.npy")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unialign: error:") and str(bad) in err[0], err


LIBRARY_PROBE = """
import sys
import unialign
unialign.load
from unialign import model, losses, data
import unialign.model.factory
import unialign.config
print("LOADED", [m for m in ("lightning", "webdataset") if m in sys.modules])
"""


def test_library_imports_without_lightning_or_webdataset(tmp_path):
    """The library (`unialign.load`, model, losses, data, config) is usable without the `train` extra."""
    out = subprocess.run([sys.executable, "-c", LIBRARY_PROBE], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    line = next((x for x in out.stdout.splitlines() if x.startswith("LOADED")), None)
    assert line == "LOADED []", (line, out.stderr[-1000:])


@pytest.mark.parametrize("missing", ["lightning", "webdataset"])
@pytest.mark.parametrize("command", ["train", "teacher-cache"])
def test_training_commands_without_the_train_extra_say_what_to_install(command, missing, monkeypatch, tmp_path):
    from unialign.cli import main

    monkeypatch.setitem(sys.modules, missing, None)  # what an absent package looks like to find_spec
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", str(tmp_path / "run.yaml"), "--output", str(tmp_path / "out")])
    message = str(exit_info.value.code)
    assert len(message.splitlines()) == 1 and "pip install unialign[train]" in message, message
