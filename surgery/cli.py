"""The ``surgery`` command line: one subcommand per module in :mod:`surgery.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Commands parse, validate, call one library function and
print a summary; all the work lives in the library.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import pkgutil
import sys
import warnings

from surgery.errors import SurgeryError

LOG = logging.getLogger("surgery")


def _command_modules():
    import surgery.commands as pkg

    mods = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"surgery.commands.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            mods.append(mod)
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surgery",
        description="Cross-tokenizer model surgery: align vocabularies, transplant tokenizers, "
        "distill across vocabularies, run byte-level LMs and ensembles.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    # Our own modules report progress at INFO by default; third-party stays quiet unless -vv.
    logging.basicConfig(level=logging.WARNING if verbosity < 2 else logging.DEBUG,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("surgery", "distill"):
        logging.getLogger(name).setLevel(logging.INFO if verbosity <= 1 else level)
    if verbosity < 1:
        for name in ("surgery", "distill"):
            logging.getLogger(name).setLevel(logging.WARNING)


def quiet_libraries(verbosity: int) -> None:
    """Without ``-v``: no third-party loading bars and no library deprecation chatter on stderr.

    Our own progress bars (scoring, training) and log lines are unaffected; ``-v`` shows everything.
    """
    if verbosity > 0:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # already imported (in-process use): switch its bars off directly
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|torch|huggingface_hub|tokenizers"
                                r"|sentence_transformers|safetensors|peft)(\.|$)")


# OS errors that are about the user's paths (a folder where a file belongs, no permission, no space),
# not about our code: one line like any other bad input.
_PATH_ERRORS = (PermissionError, IsADirectoryError, NotADirectoryError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0))
    quiet_libraries(getattr(args, "verbose", 0))
    try:
        return int(args._run(args) or 0)
    except SurgeryError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except _PATH_ERRORS as e:
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        print(f"error: cannot use{where}: {e.strerror or e} (hint: check the path and its permissions)",
              file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        print(f"error: cannot write: {e.strerror} (hint: free some space or write to another disk)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the output", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
