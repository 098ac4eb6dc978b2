"""A griffe extension for the API reference: docstrings written with Sphinx roles
(``:func:`lanczos```, ``:meth:`clear_cache```, ``:class:`~torch.Tensor```) render as inline code
(``lanczos()``, ``clear_cache()``, ``Tensor``) instead of showing the roles literally, which is
what mkdocstrings' Google-style parser does with them.

Loaded by mkdocs.yml (``extensions: [docs/tools/sphinx_roles.py]``); the docstrings in the source
stay as they are, so ``help()`` and Sphinx users see them unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :role:`target`, :role:`~dotted.target`, :role:`shown text <target>`, with an optional domain
# prefix (:py:func:)
ROLE = re.compile(r":(?:py:)?(?P<role>[a-z]+):`(?P<body>[^`]+)`")
CALLABLE_ROLES = {"func", "meth"}


def render_roles(text: str) -> str:
    """``text`` with every Sphinx role replaced by Markdown inline code."""

    def replace(match: re.Match[str]) -> str:
        role, body = match["role"], match["body"].strip()
        explicit = re.fullmatch(r"(?P<shown>.+?)\s*<(?P<target>[^>]+)>", body)
        if explicit is not None:
            return f"`{explicit['shown']}`"
        if body.startswith("~"):
            body = body[1:].rsplit(".", 1)[-1]
        if role in CALLABLE_ROLES and not body.endswith(")"):
            body += "()"
        return f"`{body}`"

    return ROLE.sub(replace, text)


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every object's docstring as griffe loads it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = render_roles(obj.docstring.value)
