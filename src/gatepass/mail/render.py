"""Mail templates: per message kind a subject, a plain-text body and an HTML body.

A deployment overrides any of them by putting a file of the same name into
GATEPASS_MAIL_TEMPLATES_DIR (for example `password_reset.subject.txt`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import (ChoiceLoader, Environment, FileSystemLoader, PackageLoader, StrictUndefined,
                    TemplateNotFound)


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str | None


@lru_cache(maxsize=8)
def environment(override_dir: str | None, html: bool) -> Environment:
    loaders: list[Any] = []
    if override_dir:
        loaders.append(FileSystemLoader(override_dir))
    loaders.append(PackageLoader("gatepass.mail", "templates"))
    # HTML bodies escape what they interpolate; subjects and text bodies are plain text.
    return Environment(loader=ChoiceLoader(loaders), autoescape=html, undefined=StrictUndefined,
                       keep_trailing_newline=True)


def render(kind: str, params: dict[str, Any], override_dir: Path | None = None) -> Rendered:
    folder = str(override_dir) if override_dir else None
    text_env, html_env = environment(folder, False), environment(folder, True)
    subject = text_env.get_template(f"{kind}.subject.txt").render(params)
    text = text_env.get_template(f"{kind}.txt").render(params)
    try:
        html: str | None = html_env.get_template(f"{kind}.html").render(params)
    except TemplateNotFound:
        html = None
    return Rendered(subject=" ".join(subject.split()), text=text, html=html)
