"""`vlm-hpc COMMAND [ARGS]`: one entry point for every command; `python -m vlm_hpc.COMMAND` runs the same main.

A command's module is imported only once it is chosen, so `vlm-hpc status` does not load torch, and
`vlm-hpc worker` records stop signals before the slow imports (see `vlm_hpc.worker`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

# Subcommand -> the module whose `main(argv) -> int` runs it.
COMMANDS = {
    "submit": "vlm_hpc.submit",
    "worker": "vlm_hpc.worker",
    "status": "vlm_hpc.status",
    "verify": "vlm_hpc.verify",
    "report": "vlm_hpc.report",
    "export": "vlm_hpc.export",
    "caption": "vlm_hpc.caption",
    "convert": "vlm_hpc.convert",
    "tiny-model": "vlm_hpc.tiny_model",
}

USAGE = f"usage: vlm-hpc {{{','.join(COMMANDS)}}} [ARGS ...]   (vlm-hpc COMMAND --help for its arguments)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if not argv:
        print(f"{USAGE}\nerror: name a command", file=sys.stderr)
        return 2
    command, *rest = argv
    if command not in COMMANDS:
        print(f"{USAGE}\nerror: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return command_main(command)(rest)


def command_main(command: str) -> Callable[[list[str] | None], int]:
    """The chosen command's main, imported only now; plain imports of our own modules, never a computed name."""
    match command:
        case "submit":
            from vlm_hpc.submit import main
        case "worker":
            from vlm_hpc.worker import main
        case "status":
            from vlm_hpc.status import main
        case "verify":
            from vlm_hpc.verify import main
        case "report":
            from vlm_hpc.report import main
        case "export":
            from vlm_hpc.export import main
        case "caption":
            from vlm_hpc.caption import main
        case "convert":
            from vlm_hpc.convert import main
        case "tiny-model":
            from vlm_hpc.tiny_model import main
        case _:
            raise KeyError(command)
    return main


if __name__ == "__main__":
    sys.exit(main())
