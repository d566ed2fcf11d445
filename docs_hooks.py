"""Build helpers of the documentation (mkdocs hooks and a griffe extension).

The API reference is generated from the docstrings by mkdocstrings:

* its headings are named by full path (``#creditguard.Spend``); pages link to the short
  form (``reference.md#spend``), so :class:`ShortAnchors` gives every public name an anchor
  of its own, lower-cased, at the top of its docstring;
* the docstrings use Sphinx-style roles (``:class:`Spend```); :func:`on_page_content` shows
  those as the code they name, and tells mkdocs' link checks about the generated anchors.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

PUBLIC_MODULES = ("creditguard", "creditguard.testing")
_ROLE = re.compile(r":(?:class|func|meth|attr|data|exc|mod|obj):<code>~?")


class ShortAnchors(griffe.Extension):
    """Prefix the docstring of every name in a public module's ``__all__`` with an anchor
    named after it (``<a id="spend"></a>``)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for path in PUBLIC_MODULES:
            if not path.startswith(pkg.path):
                continue
            module = pkg if path == pkg.path else pkg.modules_collection[path]
            for name in module.exports or ():
                member = module.get_member(str(name))
                target = member.final_target if member.is_alias else member
                docstring = target.docstring
                if docstring is not None and "<a id=" not in docstring.value:
                    docstring.value = f'<a id="{str(name).lower()}"></a>\n\n{docstring.value}'


_ID = re.compile(r"""\bid=["']([^"']+)["']""")


def on_page_content(html: str, *, page: Any, **kwargs: Any) -> str:
    """Drop the role prefix in front of inline code in the rendered page, and let the link
    checks know the anchors of the generated API (they are not in the page's Markdown)."""
    if page.present_anchor_ids is not None:
        page.present_anchor_ids |= set(_ID.findall(html))
    return _ROLE.sub("<code>", html)
