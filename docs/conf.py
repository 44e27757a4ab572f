"""Sphinx configuration of gpufleet's API reference (`make docs`: warnings are errors).

The reference is built from the docstrings of the package as built (PYTHONPATH names a staged build,
so the compiled core's docstrings and signatures are the real ones). Each part's page lists the
names of that part's ``__all__`` (the ``gpufleet-part`` directive in _ext/gpufleet_docs.py), so a new
public name appears in the reference without editing the page. The tour and the install notes are
the README's own sections, included between markers, so there is one text to keep up to date.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext"))

import gpufleet  # noqa: E402 - the build under test (PYTHONPATH)

project = "gpufleet"
author = "the gpufleet authors"
copyright = "the gpufleet authors, Apache License 2.0"
release = version = gpufleet.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser", "gpufleet_docs"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "signature"
autoclass_content = "both"
# Methods without a docstring of their own (GPUExecutor.submit) would inherit the standard library's,
# which is not reStructuredText.
autodoc_inherit_docstrings = False
napoleon_google_docstring = False
napoleon_numpy_docstring = True
myst_heading_anchors = 3
# The README's sections start at level 2: included into a page, they are its subsections.
suppress_warnings = ["myst.header"]
html_theme = "alabaster"
html_theme_options = {"description": "Spread GPU work across devices", "fixed_sidebar": True}
html_static_path: list = []
