"""Refresh ``lensmor-schemas-<version>.json`` from a published Lensmor OpenAPI document.

    python tests/data/extract_lensmor_schemas.py path/to/lensmor-openapi.json

Copies the named component schemas and every schema they reference, unchanged, under
``components.schemas`` (so their ``$ref``s resolve as in the document), with a note of the
document's version. The tests never read the OpenAPI document itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

NAMES = (
    "ApiError",
    "CreditBalance",
    "EventUnlockResult",
    "EventVisitorUnlockResult",
    "EventFullAccessUnlockResult",
    "FeatureUnavailableBusinessError",
    "ContactUnlockSubmission",
    "ContactUnlockTask",
    "PhoneUnlockRequest",
    "PhoneUnlockTask",
    "ActionPrecheckRequest",
    "ActionPrecheckResponse",
    "ConcurrencyLimitBusinessError",
    "EventReverseSearchPage",
    "ExhibitorPage",
)
PREFIX = "#/components/schemas/"


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"].removeprefix(PREFIX)} if "$ref" in node else set()
        return found.union(*(_refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(value) for value in node))
    return set()


def extract(document: dict[str, Any]) -> dict[str, Any]:
    schemas = document["components"]["schemas"]
    wanted: dict[str, Any] = {}
    todo = list(NAMES)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted[name] = schemas[name]
            todo.extend(_refs(schemas[name]))
    version = document["info"]["version"]
    return {
        "note": (
            f"Schemas copied unchanged from Lensmor's published OpenAPI document, version"
            f" {version} (OpenAPI {document['openapi']}, JSON Schema 2020-12), by"
            " tests/data/extract_lensmor_schemas.py: the answers the sandbox's conformance"
            " test validates, and what they reference."
        ),
        "version": version,
        "components": {"schemas": dict(sorted(wanted.items()))},
    }


def main(argv: list[str]) -> int:
    document = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    out = extract(document)
    target = Path(__file__).with_name(f"lensmor-schemas-{out['version']}.json")
    target.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {target.name}: {', '.join(out['components']['schemas'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
