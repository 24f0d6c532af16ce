"""`python -m vlm_hpc.caption --model DIR IMAGE...`: caption image files, one JSON object per line per image.

For trying prompts and for checks; datasets go through `vlm_hpc.worker`. Each line is
`{"image", "tiles", "caption", "token_ids"}`, or `{"image", "error", "reason"}` for an image that cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vlm_hpc.engines.base import GenerationSettings
from vlm_hpc.engines.transformers import TransformersEngine
from vlm_hpc.errors import ImageRejected, VlmHpcError, print_error
from vlm_hpc.internvl.prompt import CAPTION_QUESTION
from vlm_hpc.preprocess.decode import decode_image
from vlm_hpc.preprocess.tiling import tile_image

DEFAULTS = GenerationSettings()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlm_hpc.caption", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, WebP, ...)")
    parser.add_argument("--model", required=True, help="InternVL-Chat-V1-5 folder (original or converted)")
    parser.add_argument("--max-num", type=int, default=9, help="most tiles per image before the thumbnail (9)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens,
                        help=f"longest caption, in tokens ({DEFAULTS.max_new_tokens})")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                        help=f"sampling temperature ({DEFAULTS.temperature})")
    parser.add_argument("--top-p", type=float, default=DEFAULTS.top_p, help=f"nucleus sampling ({DEFAULTS.top_p})")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help=f"sampling seed ({DEFAULTS.seed})")
    parser.add_argument("--question", default=CAPTION_QUESTION, help="the prompt (default: the seed's caption prompt)")
    parser.add_argument("--system-message", default=None, help="default: config.json's, else the template's")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=6, help="images captioned together (6)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    settings = GenerationSettings(do_sample=not args.greedy, temperature=args.temperature, top_p=args.top_p,
                                  max_new_tokens=args.max_new_tokens, seed=args.seed)
    try:
        if args.max_num < 1 or args.batch_size < 1:
            raise VlmHpcError("--max-num and --batch-size must be at least 1")
        engine = TransformersEngine.from_folder(args.model, dtype=dtype, device=device, question=args.question,
                                                system_message=args.system_message, settings=settings)
    except VlmHpcError as exc:
        return print_error(exc)
    failed = 0
    queue: list[tuple[str, torch.Tensor | None, dict | None]] = []  # in input order: tiles, or an error line

    def flush() -> None:
        captions = iter(engine.caption([tiles for _, tiles, _ in queue if tiles is not None]))
        for name, tiles, error in queue:
            if error is None:
                caption = next(captions)
                error = {"image": name, "tiles": tiles.shape[0], "caption": caption.text,
                         "token_ids": caption.token_ids}
            print(json.dumps(error, ensure_ascii=False), flush=True)
        queue.clear()

    for name in args.images:
        try:
            queue.append((name, tile_image(decode_image(Path(name).read_bytes()).image, args.max_num), None))
        except (OSError, ImageRejected) as exc:
            failed += 1
            reason = exc.reason if isinstance(exc, ImageRejected) else "unreadable"
            queue.append((name, None, {"image": name, "error": str(exc), "reason": reason}))
        if sum(tiles is not None for _, tiles, _ in queue) == args.batch_size:
            flush()
    flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
