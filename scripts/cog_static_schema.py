"""Read predict.py's and train.py's inputs the way `cog build` does: from the source text, importing nothing.

`cog build` (0.19 and later) never imports the predictor: it parses the file with tree-sitter and
keeps only what it can read as literals. The schema it writes into the image label is the one
coglet validates requests against on Replicate, so anything it cannot read is lost there even
though an import-based schema (scripts/cog_schema.py) and the tests see it. This module is a port
of those reading rules, so a test can compare both readings field by field.

Ported from replicate/cog at commit 6110c912377d4ded0f57165d305821a14a9a4418 (21 Aug 2026):
pkg/schema/python/literals.go (parseDefaultValue, parseStringLiteral, parseNumberLiteral,
parseListLiteral, ...), module_scope.go (collectModuleScope, resolve*Expr, resolveChoicesCall),
inputs.go (parseInputCall, parseTypedDefaultParameter, isInputCall), imports.go (aliases of
`cog.Input`), target.go (which function is read) and pkg/schema/openapi_spec.go
(buildInputSchema: effective default, required, nullable). Same grammar family (tree-sitter
Python), so node types match the Go code's. What the port leaves out, because predict.py and
train.py do not use it, raises `NotPorted` instead of guessing: Input() references through class
attributes or static methods, and type resolution beyond "is it Optional / a Secret".

Rules worth knowing when writing an `Input(...)` (each is a line of the Go code):
- A scope name is a same-file, top-level `NAME = <literal>`; imports are not followed.
- `choices=`: a list literal, a scope name bound to a list (or tuple) literal, `+` of those, or
  `list(D.keys())` / `list(D.values())` of a scope dict literal. Anything else stops the build.
- `default=`: a literal or a scope name; anything else becomes None, which on a non-Optional
  input means "required, no default".
- `ge=` / `le=`: the source text must parse as a number (Go's ParseFloat): no names, no
  parentheses, no `1_000`.
- `description=`: a string literal or a scope string. The literal is the source text between
  its quotes: escapes are not decoded, an f-string or a parenthesised string is dropped, and
  adjacent literals ("a " "b") come out with the raw `" "` between them.

Usage: python scripts/cog_static_schema.py [predict.py:Predictor | train.py:train] (prints JSON)
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tree_sitter_python
from tree_sitter import Language, Node, Parser

COG_COMMIT = "6110c912377d4ded0f57165d305821a14a9a4418"
_PARSER = Parser(Language(tree_sitter_python.language()))


class StaticSchemaError(Exception):
    """What makes `cog build` stop (ErrChoicesNotResolvable, ErrDefaultNotResolvable, ...)."""


class NotPorted(Exception):
    """A construct cog reads that this port does not: the comparison cannot be trusted."""


@dataclass(frozen=True)
class Value:
    """schema.DefaultValue: a kind and its data (a list of Values for list/set, pairs for dict)."""

    kind: str  # none, bool, int, float, str, list, set, dict
    data: Any = None

    def to_json(self) -> Any:
        if self.kind in ("list", "set"):
            return [item.to_json() for item in self.data]
        if self.kind == "dict":
            return {(k.data if k.kind == "str" else str(k.to_json())): v.to_json() for k, v in self.data}
        return self.data


@dataclass
class StaticInput:
    """One parameter as cog's parser records it (schema.InputField, minus type resolution)."""

    name: str
    order: int
    optional: bool
    secret: bool
    default: Value | None = None
    description: str | None = None
    ge: float | None = None
    le: float | None = None
    choices: list[Value] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _text(node: Node) -> str:
    return node.text.decode()


def _go_parse_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, 64): base prefixes and underscores allowed, 64-bit range."""
    try:
        value = int(text, 0)
    except ValueError:
        return None
    return value if -(2**63) <= value < 2**63 else None


def _go_parse_float(text: str) -> float | None:
    """strconv.ParseFloat(text, 64): no underscores without a base prefix; inf/nan are accepted."""
    if "_" in text and not re.match(r"[+-]?0[xX]", text):
        return None
    try:
        return float(text)
    except ValueError:
        try:
            return float.fromhex(text)
        except ValueError:
            return None


def parse_string_literal(node: Node) -> str | None:
    """literals.go parseStringLiteral: the text between the outer quotes, nothing decoded."""
    text = _text(node)
    if text.startswith(('"""', "'''")):
        return text[3:-3] if len(text) >= 6 else None
    if text.startswith(('"', "'")):
        return text[1:-1] if len(text) >= 2 else None
    if text.startswith(('r"', "r'")):
        return text[2:-1] if len(text) >= 3 else None
    return None


def parse_number_literal(node: Node) -> float | None:
    return _go_parse_float(_text(node).strip())


def parse_default_value(node: Node) -> Value | None:
    """literals.go parseDefaultValue."""
    kind = node.type
    if kind == "none":
        return Value("none")
    if kind in ("true", "false"):
        return Value("bool", kind == "true")
    if kind == "integer":
        number = _go_parse_int(_text(node))
        return None if number is None else Value("int", number)
    if kind == "float":
        real = _go_parse_float(_text(node))
        return None if real is None else Value("float", real)
    if kind in ("string", "concatenated_string"):
        text = parse_string_literal(node)
        return None if text is None else Value("str", text)
    if kind in ("list", "set"):
        items = _parse_items(node)
        return None if items is None else Value(kind, items)
    if kind == "dictionary":
        pairs = []
        for child in node.named_children:
            key, value = child.child_by_field_name("key"), child.child_by_field_name("value")
            if child.type != "pair" or key is None or value is None:
                continue
            parsed_key, parsed_value = parse_default_value(key), parse_default_value(value)
            if parsed_key is not None and parsed_value is not None:
                pairs.append((parsed_key, parsed_value))
        return Value("dict", pairs)
    if kind == "unary_operator":
        text = _text(node).strip()
        number = _go_parse_int(text)
        if number is not None:
            return Value("int", number)
        real = _go_parse_float(text)
        return None if real is None else Value("float", real)
    if kind == "tuple":  # items that do not parse are skipped, as in the Go code
        return Value("list", [v for v in map(parse_default_value, node.named_children) if v is not None])
    return None


def _parse_items(node: Node) -> list[Value] | None:
    """parseListLiteral / parseSetLiteral: every named child must parse (a comment does not)."""
    items = []
    for child in node.named_children:
        value = parse_default_value(child)
        if value is None:
            return None
        items.append(value)
    return items


def _parse_list_literal(node: Node) -> list[Value] | None:
    return _parse_items(node) if node.type == "list" else None


def collect_module_scope(root: Node) -> dict[str, Value]:
    """module_scope.go collectModuleScope: top-level `NAME = <literal>`, later ones win."""
    scope: dict[str, Value] = {}
    for child in root.named_children:
        assign = None
        if child.type == "expression_statement" and child.named_child_count == 1:
            if child.named_children[0].type == "assignment":
                assign = child.named_children[0]
        elif child.type == "assignment":
            assign = child
        if assign is None:
            continue
        left, right = assign.child_by_field_name("left"), assign.child_by_field_name("right")
        if left is None or left.type != "identifier" or right is None:
            continue
        value = parse_default_value(right)
        if value is not None:
            scope[_text(left)] = value
    return scope


def _resolve_string(node: Node, scope: dict[str, Value]) -> str | None:
    text = parse_string_literal(node)
    if text is not None:
        return text
    if node.type == "identifier":
        value = scope.get(_text(node))
        if value is not None and value.kind == "str":
            return value.data
    return None


def _resolve_default(node: Node, scope: dict[str, Value]) -> Value | None:
    value = parse_default_value(node)
    if value is not None:
        return value
    return scope.get(_text(node)) if node.type == "identifier" else None


def _resolve_choices(node: Node, scope: dict[str, Value]) -> list[Value] | None:
    """module_scope.go resolveChoicesExpr / resolveChoicesCall."""
    if node.type == "list":
        return _parse_list_literal(node)
    if node.type == "identifier":
        value = scope.get(_text(node))
        return value.data if value is not None and value.kind == "list" else None
    if node.type == "call":
        function, args = node.child_by_field_name("function"), node.child_by_field_name("arguments")
        if function is None or _text(function) != "list" or args is None or not args.named_children:
            return None
        inner = args.named_children[0]
        inner_function = inner.child_by_field_name("function") if inner.type == "call" else None
        if inner_function is None or inner_function.type != "attribute":
            return None
        obj, attr = inner_function.child_by_field_name("object"), inner_function.child_by_field_name("attribute")
        if obj is None or attr is None or obj.type != "identifier":
            return None
        value = scope.get(_text(obj))
        if value is None or value.kind != "dict":
            return None
        index = {"keys": 0, "values": 1}.get(_text(attr))
        return None if index is None else [pair[index] for pair in value.data]
    if node.type == "binary_operator":
        if not any(not c.is_named and _text(c) == "+" for c in node.children):
            return None
        left, right = node.child_by_field_name("left"), node.child_by_field_name("right")
        if left is None or right is None:
            return None
        left_items, right_items = _resolve_choices(left, scope), _resolve_choices(right, scope)
        if left_items is None or right_items is None:
            return None
        return left_items + right_items
    return None


def _collect_imports(root: Node) -> dict[str, tuple[str, str]]:
    """imports.go, the part that matters here: `from module import Name [as alias]`."""
    names: dict[str, tuple[str, str]] = {}
    for child in root.named_children:
        if child.type != "import_from_statement":
            continue
        module_node = child.child_by_field_name("module_name")
        if module_node is None:
            continue
        module = _text(module_node)
        for node in child.children_by_field_name("name"):
            if node.type == "dotted_name":
                names[_text(node)] = (module, _text(node))
            elif node.type == "aliased_import":
                original, alias = node.child_by_field_name("name"), node.child_by_field_name("alias")
                if original is not None:
                    names[_text(alias if alias is not None else original)] = (module, _text(original))
    return names


def _is_input_call(node: Node, imports: dict[str, tuple[str, str]]) -> bool:
    if node.type != "call":
        return False
    function = node.child_by_field_name("function")
    if function is None:
        return False
    name = _text(function)
    return name == "Input" or imports.get(name) == ("cog", "Input")


def _parse_input_call(node: Node, item: StaticInput, scope: dict[str, Value]) -> None:
    """inputs.go parseInputCall: keyword arguments only; positional ones are ignored."""
    args = node.child_by_field_name("arguments")
    for child in args.named_children if args is not None else ():
        if child.type != "keyword_argument":
            continue
        key_node, value = child.child_by_field_name("name"), child.child_by_field_name("value")
        if key_node is None or value is None:
            continue
        key = _text(key_node)
        if key == "default":
            item.default = _resolve_default(value, scope) or Value("none")
        elif key == "default_factory":
            raise StaticSchemaError(f"parameter '{item.name}': default_factory is not supported")
        elif key == "description":
            item.description = _resolve_string(value, scope)
        elif key in ("ge", "le"):
            setattr(item, key, parse_number_literal(value))
        elif key == "choices":
            choices = _parse_list_literal(value)
            if choices is None:
                choices = _resolve_choices(value, scope)
            if choices is None:
                raise StaticSchemaError(
                    f"parameter '{item.name}': choices expression `{_text(value)}` cannot be statically resolved"
                )
            item.choices = choices
        elif key in ("min_length", "max_length"):
            number = parse_number_literal(value)
            item.extra[key] = None if number is None else int(number)
        elif key in ("regex", "accept"):
            item.extra[key] = parse_string_literal(value)
        elif key == "deprecated" and value.type in ("true", "false"):
            item.extra[key] = value.type == "true"


def _annotation_flags(type_node: Node) -> tuple[bool, bool]:
    """(optional, secret) from the annotation: Optional[T], Union[..., None], T | None, Secret."""
    text = re.sub(r"\s+", "", _text(type_node)).strip("\"'")
    parts = re.split(r"[\[\],|]", text)
    optional = text.startswith(("Optional[", "typing.Optional[")) or (
        "None" in parts and (text.startswith(("Union[", "typing.Union[")) or "|" in text)
    )
    base = text.removeprefix("typing.").removeprefix("Optional[").rstrip("]")
    return optional, base in ("Secret", "cog.Secret")


def _find_target(root: Node, ref: str, train: bool) -> Node:
    """target.go: the class's run() (or legacy predict()/named method), else a top-level function."""
    functions = {}
    for child in root.named_children:
        node = child.child_by_field_name("definition") if child.type == "decorated_definition" else child
        if node is None:
            continue
        name_node = node.child_by_field_name("name")
        if name_node is None:
            continue
        if node.type == "class_definition" and _text(name_node) == ref:
            methods = {}
            body = node.child_by_field_name("body")
            for stmt in body.named_children if body is not None else ():
                method = stmt.child_by_field_name("definition") if stmt.type == "decorated_definition" else stmt
                if method is not None and method.type == "function_definition":
                    methods[_text(method.child_by_field_name("name"))] = method
            wanted = ("train",) if train else ("run", "predict")
            for method_name in wanted:
                if method_name in methods:
                    return methods[method_name]
            raise StaticSchemaError(f"{ref} must define {' or '.join(wanted)}()")
        if node.type == "function_definition":
            functions[_text(name_node)] = node
    for name in (ref, "train" if train else "predict"):
        if name in functions:
            return functions[name]
    raise StaticSchemaError(f"predictor not found: {ref}")


def read_inputs(source: str | bytes, ref: str, train: bool = False) -> list[StaticInput]:
    """Every parameter of the target, read by cog's rules; raises StaticSchemaError where cog stops."""
    data = source.encode() if isinstance(source, str) else source
    root = _PARSER.parse(data).root_node
    scope, imports = collect_module_scope(root), _collect_imports(root)
    params = _find_target(root, ref, train).child_by_field_name("parameters")
    inputs: list[StaticInput] = []
    errors: list[str] = []
    for child in params.children:
        if child.type == "identifier":
            continue
        if child.type == "default_parameter":
            raise StaticSchemaError(f"parameter '{_text(child.child_by_field_name('name'))}' has no type annotation")
        if child.type == "typed_parameter":
            name = next(_text(c) for c in child.named_children if c.type == "identifier")
            type_node = next(c for c in child.named_children if c.type == "type")
            inputs.append(StaticInput(name, len(inputs), *_annotation_flags(type_node)))
            continue
        if child.type != "typed_default_parameter":
            continue
        name = _text(child.child_by_field_name("name"))
        item = StaticInput(name, len(inputs), *_annotation_flags(child.child_by_field_name("type")))
        value = child.child_by_field_name("value")
        if _is_input_call(value, imports):
            try:
                _parse_input_call(value, item, scope)
            except StaticSchemaError as error:  # cog stops at the first; all of them are listed here
                errors.append(str(error))
        elif value.type in ("attribute", "call"):
            raise NotPorted(f"parameter '{name}': Input() reached through `{_text(value)}`")
        else:
            default = _resolve_default(value, scope)
            if default is None:
                errors.append(f"parameter '{name}': default `{_text(value)}` cannot be statically resolved")
            item.default = default
        inputs.append(item)
    if errors:
        raise StaticSchemaError("cog build stops here:\n" + "\n".join(errors))
    return inputs


_EXTRA_KEYS = {"min_length": "minLength", "max_length": "maxLength", "regex": "pattern", "accept": "x-cog-accept"}


def input_properties(inputs: list[StaticInput]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """openapi_spec.go buildInputSchema, the value-bearing keys: properties and the required list."""
    properties: dict[str, dict[str, Any]] = {}
    required = []
    for item in inputs:
        prop: dict[str, Any] = {"x-order": item.order}
        if item.choices:
            prop["enum"] = [choice.to_json() for choice in item.choices]
        nullable = item.optional or (item.secret and item.default is not None and item.default.kind == "none")
        has_default = item.default is not None and (item.default.kind != "none" or nullable)
        if not has_default and not item.optional:
            required.append(item.name)
        if has_default:
            prop["default"] = item.default.to_json()
        if nullable:
            prop["nullable"] = True
        for key, value in (("description", item.description), ("minimum", item.ge), ("maximum", item.le)):
            if value is not None:
                prop[key] = value
        for key, name in _EXTRA_KEYS.items():
            if item.extra.get(key) is not None:
                prop[name] = item.extra[key]
        if item.extra.get("deprecated"):
            prop["deprecated"] = True
        properties[item.name] = prop
    return properties, required


def read_file(path: Path, ref: str, train: bool = False) -> tuple[dict[str, dict[str, Any]], list[str]]:
    return input_properties(read_inputs(path.read_bytes(), ref, train))


def main() -> None:
    target = sys.argv[1] if len(sys.argv) > 1 else "predict.py:Predictor"
    path, ref = target.split(":")
    properties, required = read_file(Path(path), ref, train=Path(path).stem == "train")
    json.dump({"properties": properties, "required": required}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
