"""Builders for worker tests: small datasets, configs, and worker processes."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import yaml
from PIL import Image


def png(seed: int, size: tuple[int, int] = (48, 48), mode: str = "RGB") -> bytes:
    """A small deterministic noise image."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def make_dataset(folder: Path, rows: list[tuple[str | None, bytes | None, str | None]]) -> Path:
    """A datasets.save_to_disk folder with the seed's columns (new_key, png, caption)."""
    features = datasets.Features({"new_key": datasets.Value("string"), "png": datasets.Value("binary"),
                                  "caption": datasets.Value("string")})
    table = {"new_key": [r[0] for r in rows], "png": [r[1] for r in rows], "caption": [r[2] for r in rows]}
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(folder))
    return folder


def noise_dataset(folder: Path, count: int) -> Path:
    return make_dataset(folder, [(f"img_{i:04d}", png(i), f"web caption {i}") for i in range(count)])


def slow_dataset(folder: Path, count: int) -> Path:
    """Images that tile into 7 tiles each (4:3 at max_num 6), so that a slice takes long enough to be
    stopped midway."""
    return make_dataset(folder, [(f"row_{i:04d}", png(i, (64, 48)), f"web {i}") for i in range(count)])


def write_config(path: Path, model_path: Path, data_path: Path, output_dir: Path, **sections: dict) -> Path:
    """A worker config for the tiny model on the CPU: greedy, short, small batches."""
    config = {
        "model": {"path": str(model_path), "dtype": "float32", "device": "cpu"},
        "data": {"path": str(data_path)},
        "tiling": {"max_num": 6},
        "generation": {"batch_size": 4, "do_sample": False, "max_new_tokens": 12},
        "output": {"dir": str(output_dir)},
        "worker": {"loader_workers": 1, "grace_seconds": 10, "heartbeat_seconds": 1},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def start_worker(config: Path, slice_id: int = 0, count: int = 1, *overrides: str) -> subprocess.Popen:
    # Its own process group, so that a test can signal the whole task (DataLoader workers too), as Slurm does.
    return subprocess.Popen([sys.executable, "-m", "vlm_hpc.worker", "--config", str(config), "--slice", str(slice_id),
                             "--num-slices", str(count), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def committed_rows(output: Path, slice_id: int = 0) -> int:
    try:
        state = json.loads((output / "state" / f"slice_{slice_id:05d}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return sum(b - a for a, b in state["done"])


def slice_state(output: Path, slice_id: int = 0) -> dict:
    return json.loads((output / "state" / f"slice_{slice_id:05d}.json").read_text())


def stop(process: subprocess.Popen, number: int = signal.SIGKILL) -> None:
    if process.poll() is None:
        process.send_signal(number)
    process.wait(timeout=60)


def read_captions(output: Path) -> dict[str, dict]:
    captions = {}
    for path in (output / "captions").rglob("*.json"):
        captions[path.stem] = json.loads(path.read_text())
    for path in (output / "captions").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            captions[record["key"]] = {"web_caption": record["web_caption"], "vlm_caption": record["vlm_caption"]}
    return captions


# A model folder's conversation.py, written for these tests in the shape of InternVL's: the class and the
# registry it imports, then the internlm2-chat registration with SYSTEM_MESSAGE standing for the literal.
CONVERSATION_PY = """\
import dataclasses
from enum import IntEnum, auto


class SeparatorStyle(IntEnum):
    ADD_COLON_SINGLE = auto()
    MPT = auto()


@dataclasses.dataclass
class Conversation:
    name: str
    system_template: str = '{system_message}'
    system_message: str = ''
    roles: tuple = ('USER', 'ASSISTANT')
    sep_style: SeparatorStyle = SeparatorStyle.ADD_COLON_SINGLE
    sep: str = '\\n'
    stop_token_ids: list = None


conv_templates = {}


def register_conv_template(template, override=False):
    if not override:
        assert template.name not in conv_templates, f'{template.name} has been registered.'
    conv_templates[template.name] = template


register_conv_template(
    Conversation(
        name='internlm2-chat',
        system_template='<|im_start|>system\\n{system_message}',
        SYSTEM_MESSAGE
        roles=('<|im_start|>user\\n', '<|im_start|>assistant\\n'),
        sep_style=SeparatorStyle.MPT,
        sep='<|im_end|>',
    )
)
"""
V15_LINE = "system_message='You are an AI assistant whose name is InternLM (书生·浦语).',"


def write_conversation(folder: Path, message_line: str = V15_LINE, before: str = "",
                       after: str = "") -> Path:
    """Write `folder`/conversation.py with `message_line` as the template's system_message argument, `before`
    just above the registration and `after` at the end."""
    text = CONVERSATION_PY.replace("SYSTEM_MESSAGE", message_line)
    path = folder / "conversation.py"
    path.write_text(text.replace("\nregister_conv_template(\n", f"\n{before}\nregister_conv_template(\n", 1) + after)
    return path
