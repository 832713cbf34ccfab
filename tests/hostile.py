"""The harness of the hostile-input suite (``tests/test_hostile_*.py``): a helper module, like
pipeline_fixtures.py (test modules import it, never each other).

Each hostile case runs the command in-process through ``cli.main`` and asserts the promise of
README: exit status 2, exactly one line on stderr that says what was wrong, no traceback, and
every file that existed before is unchanged (same bytes) and still there.
"""
import hashlib
import os

from unclip_jax import cli


def snapshot(*roots) -> dict[str, str]:
    """Every file under ``roots`` (files or folders) -> sha256 of its bytes (links by target)."""
    out = {}
    for root in roots:
        root = os.fspath(root)
        if os.path.isfile(root) or os.path.islink(root):
            walk = [(os.path.dirname(root), [], [os.path.basename(root)])]
        else:
            walk = os.walk(root)
        for folder, _, files in walk:
            for f in files:
                p = os.path.join(folder, f)
                if os.path.islink(p):
                    out[p] = "link:" + os.readlink(p)
                else:
                    with open(p, "rb") as fh:
                        out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


def run_cli(capsys, argv) -> tuple[int, str, str]:
    """``unclip-jax ARGV`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def error_lines(err: str) -> list[str]:
    """stderr's lines less progress bars (tqdm redraws with carriage returns)."""
    return [l for l in err.replace("\r", "\n").splitlines()
            if l.strip() and not l.lstrip().startswith(("generate:", "sample:"))]


def assert_refused(capsys, argv, *, says: str | tuple[str, ...], keep=(), status: int = 2) -> str:
    """Run ``argv``; assert it is refused with ``status``, one stderr line containing every
    string of ``says`` (case-insensitive) and no traceback, and that every file under ``keep``
    is unchanged. Returns the line."""
    before = snapshot(*keep)
    rc, _, err = run_cli(capsys, argv)
    lines = error_lines(err)
    assert "Traceback" not in err, err
    assert rc == status, (rc, err)
    assert len(lines) == 1, err
    for s in (says,) if isinstance(says, str) else says:
        assert s.lower() in lines[0].lower(), (s, lines[0])
    assert snapshot(*keep) == before, "a pre-existing file was changed or removed"
    return lines[0]
