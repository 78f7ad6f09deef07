"""Run `terdit` commands in forked child processes (not a test module): a child may be killed (fault
injection) or signalled without touching the test process, and forking skips a fresh interpreter's imports."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

TMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")  # terdit's temporaries: .<name>.<random>.tmp
OLD_RE = re.compile(r"^\..+\.old$")  # a directory moved aside while being replaced


@dataclass
class Result:
    rc: int
    out: str


_warm = False


def _warm_up() -> None:
    """Import once, in the test process, what every child would otherwise import again (seconds each):
    the sub-command modules, scikit-learn's digits, the optimizer's dynamo hooks."""
    global _warm
    if _warm:
        return
    import torch

    from terdit import cli
    from terdit.data.digits import load_digits_arrays

    cli.build_parser()
    load_digits_arrays()
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    _warm = True


def terdit(argv: list[str], env: dict[str, str] | None = None) -> Result:
    """`terdit ARGV` in a forked child with `env` added; its exit status (137 when a fault killed it)."""
    import torch

    _warm_up()

    with tempfile.TemporaryFile("w+") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child: never returns into pytest
            rc = 99
            try:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                torch.set_num_threads(1)
                os.environ.update(env or {})
                from terdit import cli

                rc = cli.main(argv)
            except BaseException as e:  # noqa: BLE001 - report anything, then leave
                print(f"child raised {type(e).__name__}: {e}", file=sys.stderr)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        _, status = os.waitpid(pid, 0)
        log.seek(0)
        return Result(os.waitstatus_to_exitcode(status), log.read())


def fault_sites(argv: list[str], log: Path, env: dict[str, str] | None = None) -> list[str]:
    """The fault points a clean run of `argv` passes, in order (the run must succeed)."""
    res = terdit(argv, {**(env or {}), "TERDIT_FAULT_LOG": str(log)})
    assert res.rc == 0, res.out
    return log.read_text().split()


def leftovers(root: Path) -> list[str]:
    """Temporaries, moved-aside directories and lock files anywhere under root."""
    names = (p for p in Path(root).rglob("*"))
    return sorted(str(p) for p in names if TMP_RE.match(p.name) or OLD_RE.match(p.name)
                  or re.fullmatch(r"\..*lock", p.name))


def tree(path: Path) -> dict[str, bytes]:
    """Every file below `path` with its bytes: a snapshot to compare before and after a command."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
