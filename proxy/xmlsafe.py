"""XML as the proxy reads it: defusedxml (no DTDs, no entity expansion), namespaces ignored.

Maven metadata, nuspecs and the tool configs ``login`` merges all come from elsewhere; they are
parsed here only, and looked into by local element name whatever namespace a writer used.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring


class XmlError(ValueError):
    """Not well-formed XML, or XML with a DTD or entities (refused, never expanded)."""


def parse(body: bytes) -> Element:
    try:
        root: Element = fromstring(body, forbid_dtd=True)
    except (ParseError, DefusedXmlException, ValueError) as exc:
        raise XmlError(str(exc)) from exc
    return root


def local(tag: str) -> str:
    """An element's name without its namespace."""
    return tag.rsplit("}", 1)[-1]


def child(node: Element, name: str) -> Element | None:
    """The first child called ``name`` (any namespace)."""
    for item in node:
        if local(item.tag) == name:
            return item
    return None


def text(node: Element, name: str) -> str:
    """The stripped text of the first child called ``name``, or ''."""
    item = child(node, name)
    return (item.text or "").strip() if item is not None else ""
