"""Output formats (`output.format`), one module each behind the `OutputFormat` protocol of `base`; this registry
is the one place that names them. Adding a format: a new module with a subclass, and one line here (or, from
outside the package, `register(MyFormat)`)."""

from __future__ import annotations

from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.layout import OutputLayout
from vlm_hpc.run.outputs.base import OutputFormat
from vlm_hpc.run.outputs.json_files import JsonFiles
from vlm_hpc.run.outputs.jsonl_file import JsonlFile

OUTPUT_FORMATS: dict[str, type[OutputFormat]] = {}  # output.format -> implementation; the config reads its names


def register(implementation: type[OutputFormat]) -> type[OutputFormat]:
    """Make `implementation` available as `output.format: <its name>` (usable as a class decorator)."""
    OUTPUT_FORMATS[implementation.name] = implementation
    return implementation


register(JsonFiles)
register(JsonlFile)


def output_format(name: str, layout: OutputLayout, slice_id: int) -> OutputFormat:
    """The output format `name` for slice `slice_id` of the output folder `layout`."""
    try:
        implementation = OUTPUT_FORMATS[name]
    except KeyError:
        raise VlmHpcError(f"output format {name!r} of {layout.root} is unknown; use one of "
                          f"{', '.join(OUTPUT_FORMATS)} (output.format)") from None
    return implementation(layout, slice_id)
