"""`python -m vlm_hpc.convert SRC DST`: write a native-layout copy of an original InternVL-Chat-V1-5 folder.

Streams one source shard at a time into one destination shard, so host memory stays at about one shard.
The copy loads with `vlm_hpc.internvl.loading.load_model` (and, config-wise, with transformers' own InternVL classes);
its `vlm_hpc.json` keeps what the native config cannot (the system message the original would use).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from vlm_hpc.errors import VlmHpcError, print_error
from vlm_hpc.internvl.loading import NATIVE_METADATA_FILE, inspect_model_folder
from vlm_hpc.internvl.weight_mapping import SplitShapes, map_tensor

TOKENIZER_COPY = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def convert_folder(source: str | Path, destination: str | Path) -> Path:
    """Convert an original-layout folder into a native-layout folder; returns the destination."""
    folder = inspect_model_folder(source)
    if folder.layout != "original":
        raise VlmHpcError(f"convert: {folder.path} is already in native layout; nothing to convert")
    target = Path(destination)
    if target.exists() and any(target.iterdir()):
        raise VlmHpcError(f"convert: {target} exists and is not empty; choose a new folder")
    target.mkdir(parents=True, exist_ok=True)
    shapes = SplitShapes.from_original(folder.original_config)
    weight_map: dict[str, str] = {}
    total = len(folder.weight_files)
    for number, shard in enumerate(folder.weight_files, start=1):
        name = f"model-{number:05d}-of-{total:05d}.safetensors"
        tensors = {}
        with safe_open(str(shard), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                for native_name, tensor in map_tensor(key, handle.get_tensor(key), shapes):
                    tensors[native_name] = tensor.contiguous()
        save_file(tensors, str(target / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        print(f"convert: shard {number}/{total} -> {name} ({len(tensors)} tensors)", file=sys.stderr)
    index = {"metadata": {}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    folder.config.save_pretrained(target)
    for name in TOKENIZER_COPY:
        if (folder.path / name).is_file():
            shutil.copyfile(folder.path / name, target / name)
    metadata = {"system_message": folder.system_message, "system_message_source": folder.system_message_source,
                "converted_from": str(folder.path.resolve()),
                "source_model_type": "internvl_chat", "template": folder.original_config["template"]}
    (target / NATIVE_METADATA_FILE).write_text(json.dumps(metadata, indent=1, ensure_ascii=False))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_hpc.convert", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the original InternVL-Chat-V1-5 folder")
    parser.add_argument("destination", help="a new folder for the native copy")
    args = parser.parse_args(argv)
    try:
        target = convert_folder(args.source, args.destination)
    except VlmHpcError as exc:
        return print_error(exc)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
