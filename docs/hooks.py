"""mkdocs hooks (see mkdocs.yml).

* ``rules.md`` is rendered from :func:`deepshap_opt.rules.__main__.markdown` at build time, so the site's rule
  table always matches ``deepshap_opt/rules/spec.py`` (``tests/rules`` also asserts that the committed
  ``docs/rules.md`` is current).
* nav entries whose page does not exist are dropped (logged at INFO), so that the strict build does not depend
  on every guide having been written; pages are never invented.
"""

from __future__ import annotations

import logging
import os
import re
import sys

log = logging.getLogger("mkdocs.hooks.deepshap_opt")


def _prune(items, docs_dir):
    out = []
    for item in items:
        if isinstance(item, dict):
            new = {}
            for title, value in item.items():
                if isinstance(value, list):
                    value = _prune(value, docs_dir)
                    if value:
                        new[title] = value
                elif isinstance(value, str) and "://" not in value and \
                        not os.path.exists(os.path.join(docs_dir, value)):
                    log.info("nav: %s (%s) does not exist, left out", title, value)
                else:
                    new[title] = value
            if new:
                out.append(new)
        elif isinstance(item, str) and "://" not in item and not os.path.exists(os.path.join(docs_dir, item)):
            log.info("nav: %s does not exist, left out", item)
        else:
            out.append(item)
    return out


def on_config(config, **kwargs):
    if config.get("nav"):
        config["nav"] = _prune(config["nav"], config["docs_dir"])
    return config


#: pages of the CLI / docs issue whose links to not-yet-written guides are turned into plain text
OWN_PAGES = {"index.md", "migrating.md", "deployment.md"}
_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([A-Za-z0-9_./-]+\.md)(#[^)]*)?\)")


def _unlink_missing(markdown: str, page, files) -> str:
    present = {f.src_uri for f in files}
    base = os.path.dirname(page.file.src_uri)

    def sub(m):
        target = os.path.normpath(os.path.join(base, m.group(2))).replace(os.sep, "/")
        if target in present:
            return m.group(0)
        log.info("%s: link to %s left as text (page not written yet)", page.file.src_uri, m.group(2))
        return m.group(1)

    return _LINK.sub(sub, markdown)


def on_page_markdown(markdown, page, config, files, **kwargs):
    if page.file.src_uri in OWN_PAGES:
        return _unlink_missing(markdown, page, files)
    if page.file.src_uri != "rules.md":
        return markdown
    root = os.path.dirname(os.path.abspath(config["config_file_path"]))
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        from deepshap_opt.rules.__main__ import markdown as rules_markdown
    except ImportError as exc:          # deepshap_opt not importable: keep the committed page
        log.warning("rules.md: cannot import deepshap_opt.rules (%s); using the committed file", exc)
        return markdown
    return rules_markdown()
