"""`python -m vlm_hpc.demo`: caption the bundled sample images with a tiny random model, on the CPU.

Shows the whole path (original-layout folder -> native model -> exact tiling -> batched generation) in
seconds with no GPU and no download. The captions are gibberish: the weights are random.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vlm_hpc import caption
from vlm_hpc.tiny_model import write_tiny_model

SAMPLES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "golden" / "images"


def main() -> int:
    model = write_tiny_model(Path("outputs/demo/tiny_model"))
    images = sorted(str(p) for p in SAMPLES.glob("*.png"))[:6]
    print(f"demo: tiny random model in {model}; captioning {len(images)} images", file=sys.stderr)
    return caption.main(["--model", str(model), "--greedy", "--max-new-tokens", "16", "--device", "cpu", *images])


if __name__ == "__main__":
    sys.exit(main())
