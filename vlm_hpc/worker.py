"""`python -m vlm_hpc.worker --config FILE --slice I --num-slices N [key=value ...]`: one slice, in the foreground.

This is what every array task of the sbatch template runs; `vlm_hpc.run.slice_run` does the work. The command
imports it only inside `main`, after it has started recording stop signals: a time-limit warning or a SIGTERM
during the seconds that torch and transformers take to import is acted on (requeue, or stop), not fatal.
"""

from __future__ import annotations

import argparse
import sys

from vlm_hpc.run.stop import record_stop_signals


def main(argv: list[str] | None = None) -> int:
    record_stop_signals()
    parser = argparse.ArgumentParser(prog="python -m vlm_hpc.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--slice", type=int, required=True, help="the slice to caption (an array task id): 0 to N-1")
    parser.add_argument("--num-slices", type=int, required=True,
                        help="N: slices the dataset is cut into (fixed in OUTPUT/manifest.json by the first run)")
    parser.add_argument("--accept-changes", action="store_true",
                        help="go on although settings pinned in OUTPUT/manifest.json changed (recorded there)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides: generation.batch_size=8")
    args = parser.parse_args(argv)
    from vlm_hpc.cluster import slurm
    from vlm_hpc.cluster.environment import JobEnvironment
    from vlm_hpc.config import load_config
    from vlm_hpc.errors import VlmHpcError, print_error
    from vlm_hpc.run.slice_run import run_slice

    try:
        config = load_config(args.config, args.overrides)
        outcome = run_slice(config, args.slice, args.num_slices, accept_changes=args.accept_changes)
    except VlmHpcError as exc:
        return print_error(exc)
    if outcome.status == "requeued":
        print(slurm.requeue(JobEnvironment.current().slurm_task), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
