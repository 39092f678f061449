"""Reports of unlearning runs: the HTML page (`report.html`) and the certificate.

    render_run_report(run_dir)                 -> run_dir/report.html
    render_compare_report(out_dir, run_dirs)   -> out_dir/report.html

Each page is one self-contained file: inline figures, CSS and JS, nothing fetched from the network, printable.
"""

from __future__ import annotations

__all__ = ["render_compare_report", "render_run_report"]


def __getattr__(name: str):
    # Lazy: the renderer imports matplotlib and jinja2, which `unmemorize verify` (the certificate) never needs.
    if name in __all__:
        from . import html

        return getattr(html, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
