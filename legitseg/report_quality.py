"""The report's section on input adequacy: images the `quality:` policy judged inadequate."""

from __future__ import annotations

from typing import Any


def _reason_text(reason: dict[str, Any]) -> str:
    value, limit = reason.get("value"), reason.get("limit")
    side = "<" if isinstance(value, int | float) and isinstance(limit, int | float) and value < limit else ">"
    return f"{reason.get('reason')} ({reason.get('measure')} {value:.4g} {side} {limit:.4g})" \
        if isinstance(value, int | float) and isinstance(limit, int | float) else str(reason.get("reason"))


def inadequate_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per inadequate image: its path, whether its models ran, each reason with value and limit,
    and its first thumbnail (the photograph, or a result drawn on it) when the contact sheet has one."""
    out = []
    for item in items:
        quality = item.get("quality")
        if not isinstance(quality, dict) or quality.get("adequate") is not False:
            continue
        thumbs = [t["uri"] for t in (item.get("thumbs") or {}).get("images", []) if t.get("uri")]
        out.append({"image": item["image"], "skipped": item["status"] == "inadequate",
                    "reasons": [_reason_text(r) for r in quality.get("reasons") or [] if isinstance(r, dict)],
                    "thumb": thumbs[0] if thumbs else None})
    return out
