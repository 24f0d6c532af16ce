"""output.format json (the seed's layout): one file per caption, captions/{key}.json holding
{"web_caption", "vlm_caption"}, renamed into place whole. A crash leaves a caption file complete or absent, so
resuming needs no recovery: a row that was not committed is captioned again and its file overwritten."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from vlm_hpc.run.checkpoint import SliceCheckpoint
from vlm_hpc.run.committed import parse_record
from vlm_hpc.run.layout import OutputLayout, relpath_to_key
from vlm_hpc.run.outputs.base import CaptionRecord, CommittedCaptions, Damage, OutputFormat, SliceKeys, StagedBatch


def caption_body_problem(body: object) -> str | None:
    """What is wrong with a caption as `{"web_caption", "vlm_caption"}` (a json file, or a jsonl line's fields)."""
    if not isinstance(body, dict):
        return f"a JSON {type(body).__name__}, not an object"
    if not isinstance(body.get("vlm_caption"), str) or body["vlm_caption"] == "":
        return "vlm_caption is missing, empty or not a string"
    if "web_caption" not in body:
        return "web_caption is missing"
    if not isinstance(body["web_caption"], (str, type(None))):
        return "web_caption is not a string"
    return None


class JsonFiles(OutputFormat):
    """captions/{key}.json per caption."""

    name = "json"

    def recover(self, checkpoint: SliceCheckpoint) -> None:
        pass  # files are whole or absent; the writer clears half-written temporaries

    def stage(self, records: Sequence[CaptionRecord], checkpoint: SliceCheckpoint) -> StagedBatch:
        files = [(self.layout.caption_json(record.key),
                  json.dumps({"web_caption": record.web_caption, "vlm_caption": record.vlm_caption},
                             ensure_ascii=False).encode()) for record in records]
        return StagedBatch(files=files)

    def read(self, rows: SliceKeys, checkpoint: SliceCheckpoint | None) -> CommittedCaptions:
        captions = CommittedCaptions(records={})
        for row in range(rows.start, rows.stop):
            if not rows.owns_key(row):  # such rows are failures; another row owns the key
                continue
            key = rows.key(row)
            path = self.layout.caption_json(key)
            try:
                body, problem = parse_record(path.read_bytes(), caption_body_problem)
            except FileNotFoundError:
                continue
            except OSError as exc:
                body, problem = None, f"unreadable ({exc.strerror})"
            if problem:
                captions.damage.append(Damage(path, problem, whole_file=True))
            else:
                captions.records[row] = CaptionRecord(row, key, body["web_caption"], body["vlm_caption"])
        return captions

    def has_outputs(self, rows: SliceKeys) -> bool:
        return any(self.layout.caption_json(key).exists() for key in rows.keys if key)

    @classmethod
    def orphans(cls, layout: OutputLayout, keys: set[str]) -> list[str]:
        return [str(path) for key, path in _caption_files(layout).items() if key not in keys]


def _caption_files(layout: OutputLayout) -> dict[str, Path]:
    """Every captions/**.json by key (one directory walk, no stat per key)."""
    found: dict[str, Path] = {}
    root = layout.captions_dir
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(".json") and not name.startswith("."):
                relative = os.path.relpath(os.path.join(folder, name), root)[: -len(".json")]
                found[relpath_to_key(relative)] = Path(folder) / name
    return found
