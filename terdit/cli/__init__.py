"""The `terdit` command. Each group of sub-commands is one module of this package with a `register(subparsers)`
function; its flags are generated (terdit.cli.args.add_settings) from the command's settings dataclass, where
the defaults live. This file only wires them and maps errors to exit codes: 0 success, 2 bad usage or input
(one line on stderr: library errors speak of arguments, `terdit CMD: error: ...`), 1 anything unexpected
(traceback with --debug)."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback

from terdit.errors import TerditError

# The modules of this package that define `register(subparsers)`; each adds one or more sub-commands.
COMMAND_MODULES = [
    "terdit.cli.info",  # configs, info
    "terdit.cli.train",
    "terdit.cli.sample",  # sample, sample-npz
    "terdit.cli.evaluate",  # evaluate, make-reference
    "terdit.cli.data",  # extract-latents
    "terdit.cli.deploy",  # export, convert, quantize, bench
    "terdit.cli.analysis",  # analyze
    "terdit.cli.reproduce",
    "terdit.cli.distill",
]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit status 2 (its default), no usage dump."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="terdit", description="Ternary diffusion transformers: train, sample, deploy, evaluate.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for unexpected errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (status 2) and --help (status 0)
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("TERDIT_DEBUG") == "1"
    try:
        result = args.func(args)
        return int(result or 0)
    except TerditError as e:
        print(f"terdit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as e:  # Ctrl-C, or a signal after training saved a checkpoint (Interrupted)
        print(f"terdit {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return int(getattr(e, "code", 130))
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            return _unexpected(args, e, debug)
        where = f"{e.filename}: " if e.filename else ""
        print(f"terdit {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the one place that turns crashes into exit status 1
        return _unexpected(args, e, debug)


# OS errors that are the user's to fix (disk full, no permission, read-only file system): exit 2, one line
USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR,
               errno.EISDIR, errno.ENAMETOOLONG)


def _unexpected(args: argparse.Namespace, e: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exception(e)
    else:
        print(f"terdit {args.command}: unexpected error: {type(e).__name__}: {e} (rerun with --debug)",
              file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
