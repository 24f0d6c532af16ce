"""The `internlm2-chat` template of a model folder's own `conversation.py`, read by parsing, never by running it.

The original code imports that file (trust_remote_code) and takes the template's `system_message` from the
`register_conv_template(Conversation(name='internlm2-chat', ...))` call in it; the text changed between InternVL
releases, so the user's copy is what decides. Here the file is only parsed with `ast`: values are read when they
are literals (string constants, implicitly concatenated or parenthesised strings, tuples of them), anything else
is refused with the file and line, and no statement of the file is ever evaluated.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from vlm_hpc.errors import VlmHpcError
from vlm_hpc.internvl.prompt import ROLES, SEPARATOR, SYSTEM_TEMPLATE, TEMPLATE_NAME

CONVERSATION_FILE = "conversation.py"
REGISTER = "register_conv_template"
# What build_prompt assumes of the template; a folder whose template differs would get other prompts.
EXPECTED = {"system_template": SYSTEM_TEMPLATE, "roles": ROLES, "sep": SEPARATOR}
EXPECTED_SEP_STYLE = "MPT"
# What ast.literal_eval raises for an expression that is not a plain literal.
_NOT_LITERAL = (ValueError, TypeError, SyntaxError, RecursionError)


@dataclass(frozen=True)
class FolderTemplate:
    """The template's system message and where in the file it was registered."""

    system_message: str
    line: int


def read_template(path: Path, name: str = TEMPLATE_NAME) -> FolderTemplate | None:
    """The `name` template registered at the top level of the conversation.py at `path`, None when the file
    registers none. Raises VlmHpcError when the file cannot be parsed, when a value the prompt depends on is
    not a literal, or when the template is not the one build_prompt reproduces."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as exc:
        raise VlmHpcError(f"model: {path} line {exc.lineno} is not valid Python ({exc.msg}); restore the file "
                          "from the InternVL-Chat-V1-5 download") from None
    except (OSError, ValueError) as exc:  # ValueError: NUL bytes or an undecodable file
        raise VlmHpcError(f"model: cannot read {path}: {exc}") from None
    found: tuple[ast.Call, int] | None = None
    bindings: dict[str, ast.Call] = {}  # module-level `x = Conversation(...)`, as of the statement reached
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Call):
            for target in statement.targets:
                if isinstance(target, ast.Name):
                    bindings[target.id] = statement.value
            continue
        call = statement.value if isinstance(statement, ast.Expr) else None
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == REGISTER
                and call.args):
            continue
        template = call.args[0]
        if isinstance(template, ast.Name):
            template = bindings.get(template.id)
        if not isinstance(template, ast.Call) or _keyword_literal(template, "name") != name:
            continue
        override = next((k.value for k in call.keywords if k.arg == "override"), None)
        if found is not None and not (isinstance(override, ast.Constant) and override.value is True):
            # The original's registry asserts on a second registration without override=True.
            raise VlmHpcError(f"model: {path} registers {name!r} twice (lines {found[1]} and {statement.lineno}); "
                              "the original would fail to import it; restore the file from the download")
        found = (template, statement.lineno)
    if found is None:
        return None
    template, line = found
    values = {**_class_defaults(tree, template), **{k.arg: k.value for k in template.keywords if k.arg}}
    if template.args:
        raise VlmHpcError(f"model: {path} line {line} passes the {name!r} template's fields by position; "
                          "vlm_hpc reads keyword arguments only; restore the file from the download")
    for field, expected in EXPECTED.items():
        value = _literal(values.get(field), field, path, line)
        if value != expected:
            raise VlmHpcError(f"model: {path} line {line}: the {name!r} template's {field} is {value!r}, "
                              f"vlm_hpc builds prompts with {expected!r}; this is not InternVL-Chat-V1.5's template")
    style = values.get("sep_style")
    if not (isinstance(style, ast.Attribute) and style.attr == EXPECTED_SEP_STYLE):
        raise VlmHpcError(f"model: {path} line {line}: the {name!r} template's sep_style is not "
                          f"SeparatorStyle.{EXPECTED_SEP_STYLE}; vlm_hpc builds only that prompt layout")
    message = _literal(values.get("system_message"), "system_message", path, line)
    if not isinstance(message, str):
        raise VlmHpcError(f"model: {path} line {line}: the {name!r} template's system_message is "
                          f"{type(message).__name__}, not text; set prompt.system_message instead")
    return FolderTemplate(message, line)


def _literal(node: ast.expr | None, field: str, path: Path, line: int) -> object:
    """A field's value if it is a literal; the error names the field, the file and the line."""
    if node is None:
        raise VlmHpcError(f"model: {path} line {line}: the template sets no {field} and its class has no default "
                          "vlm_hpc can read; restore the file from the InternVL-Chat-V1-5 download")
    try:
        return ast.literal_eval(node)
    except _NOT_LITERAL:
        raise VlmHpcError(f"model: {path} line {getattr(node, 'lineno', line)}: the template's {field} is not a "
                          "literal, and vlm_hpc never runs the folder's code to compute it; write it as a string "
                          "or set prompt.system_message") from None


def _keyword_literal(call: ast.Call, keyword: str) -> object:
    """A keyword argument's literal value, None when absent or not a literal (then it cannot be our template)."""
    for item in call.keywords:
        if item.arg == keyword:
            try:
                return ast.literal_eval(item.value)
            except _NOT_LITERAL:
                return None
    return None


def _class_defaults(tree: ast.Module, call: ast.Call) -> dict[str, ast.expr]:
    """The field defaults of the dataclass the template is built with, when the same file defines it (they
    apply to the fields the call leaves out)."""
    class_name = call.func.id if isinstance(call.func, ast.Name) else None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {item.target.id: item.value for item in node.body if isinstance(item, ast.AnnAssign)
                    and isinstance(item.target, ast.Name) and item.value is not None}
    return {}
