"""Sphinx configuration: ``sphinx-build -W -b html docs docs/_build`` (warnings are errors)."""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "optax_accel"
author = "optax_accel developers"
copyright = "2026, optax_accel developers"  # pylint: disable=redefined-builtin
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon",
              "sphinx.ext.mathjax", "sphinx.ext.viewcode",
              "sphinx-mathjax-offline"]  # MathJax served from _static: math renders offline
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "none"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "alabaster"
