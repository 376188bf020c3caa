"""Sphinx extension for genailab's docs: the API pages written from the packages themselves, and
cross-references through re-exports.

* On ``builder-inited`` one page per public package is written to ``docs/api/`` from the
  package's ``__all__`` and its submodules, so a function added, renamed or removed in the code
  changes the reference without anyone editing a page. Every object is documented once, under
  the module that defines it (its canonical name).
* On ``missing-reference`` a Python target that names a re-export (``genailab.VAE``,
  ``genailab.apps.denoise``, or a short name inside a package page) is imported, and the
  reference is pointed at the object's canonical name, where it is documented.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path


# The public packages, in the order of the reference (the package's own layout).
PACKAGES = (
    "genailab",
    "genailab.model",
    "genailab.likelihood",
    "genailab.data",
    "genailab.train",
    "genailab.anndata_models",
    "genailab.apps",
    "genailab.perturb",
    "genailab.eval",
    "genailab.report",
)
# Never imported for the reference: the command line (documented by ``genailab --help``) and the
# ``python -m genailab`` entry point, which runs the command line when imported.
SKIPPED = ("genailab.cli", "genailab.__main__")


def canonical_name(obj) -> str | None:
    """``module.qualname`` where ``obj`` is defined, or None for objects without both."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or not module.startswith("genailab"):
        return None
    return f"{module}.{qualname}"


def submodules(package: str) -> list[str]:
    """Public modules directly inside ``package`` that are not themselves listed packages."""
    pkg = importlib.import_module(package)
    if not hasattr(pkg, "__path__"):
        return []
    names = []
    for info in pkgutil.iter_modules(pkg.__path__):
        name = f"{package}.{info.name}"
        if info.name.startswith("_") or name in PACKAGES or name.startswith(SKIPPED):
            continue
        names.append(name)
    return sorted(names)


def _role(obj) -> str:
    if inspect.isclass(obj):
        return "class"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "func"
    return "obj"


def _summary(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
    # Roles in a summary are relative to the object's own module, not to the package page: show
    # their targets as code (the object's own entry, one click away, keeps the links).
    return re.sub(r":[\w:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", lambda m: f"``{m.group(1).split('.')[-1] if m.group(0).find('~') >= 0 else m.group(1)}``", first)


def package_page(package: str) -> str:
    """reStructuredText of one package's reference page."""
    pkg = importlib.import_module(package)
    lines = [package, "=" * len(package), "", f".. automodule:: {package}", "   :no-members:", ""]
    public = [name for name in getattr(pkg, "__all__", []) if not name.startswith("__")]
    if public:
        lines += ["Public names", "-" * 12, "", f"Importable as ``from {package} import ...``:", ""]
        for name in public:
            obj = getattr(pkg, name)
            target = canonical_name(obj)
            if target is None:
                continue
            summary = _summary(obj)
            lines.append(f"* :py:{_role(obj)}:`{name} <{target}>`" + (f": {summary}" if summary else ""))
        lines.append("")
    modules = submodules(package)
    if package == "genailab":
        modules = [m for m in modules if m not in PACKAGES]
    for module in modules:
        lines += [
            module,
            "-" * len(module),
            "",
            f".. automodule:: {module}",
            "   :members:",
            "   :show-inheritance:",
            "",
        ]
    return "\n".join(lines) + "\n"


def write_api_pages(app) -> None:
    out = Path(app.srcdir) / "api"
    out.mkdir(exist_ok=True)
    toc = ["# API reference", "", "Generated at build time from the packages' `__all__` and their modules;",
           "each object is documented once, under the module that defines it.", "",
           "```{toctree}", ":maxdepth: 1", ""]
    for package in PACKAGES:
        text = package_page(package)
        path = out / f"{package}.rst"
        if not path.exists() or path.read_text() != text:  # unchanged pages keep their timestamps
            path.write_text(text)
        toc.append(package)
    toc += ["```", ""]
    index = out / "index.md"
    text = "\n".join(toc)
    if not index.exists() or index.read_text() != text:
        index.write_text(text)


def _import_target(target: str):
    """The object a dotted name points to, importing the longest module prefix; None if none."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # noqa: BLE001 - any failure means "not a module here"
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def resolve_reexport(app, env, node, contnode):
    """Point a reference to a re-exported genailab name at the object's canonical entry."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    module = node.get("py:module") or ""
    klass = node.get("py:class") or ""
    candidates = [target]
    if module:
        candidates.insert(0, f"{module}.{target}")
        if klass:
            candidates.insert(0, f"{module}.{klass}.{target}")
    domain = env.get_domain("py")
    for candidate in candidates:
        if not candidate.startswith("genailab"):
            continue
        obj = _import_target(candidate)
        if obj is None:
            continue
        if inspect.ismodule(obj):
            canonical = obj.__name__
        else:
            canonical = canonical_name(obj)
        if canonical is None or canonical == candidate and candidate == target:
            continue
        new = node.deepcopy()
        new["reftarget"] = canonical
        found = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], canonical, new, contnode)
        if found is None and node["reftype"] != "obj":
            found = domain.resolve_xref(env, node["refdoc"], app.builder, "obj", canonical, new, contnode)
        if found is not None:
            return found
    found = _resolve_unique_suffix(app, env, node, contnode)
    if found is not None:
        return found
    return _existing_but_undocumented(node, contnode, candidates)


def _existing_but_undocumented(node, contnode, candidates):
    """A genailab name that exists but has no entry of its own (a module constant, a private
    base class, a method without a docstring) is shown as code, without a link and without a
    warning. A name that does not exist at all still warns: that is a reference gone stale."""
    for candidate in candidates:
        if candidate.startswith("genailab") and _import_target(candidate) is not None:
            return contnode
    return None


def skip_foreign_members(app, what, name, obj, skip, options):
    """Skip members that are other libraries' objects assigned in our classes (``reduce = np.mean``):
    their docstrings are not ours and their references cannot resolve here."""
    module = getattr(obj, "__module__", None)
    if (inspect.isroutine(obj) or inspect.isclass(obj)) and module and not module.startswith("genailab"):
        return True
    return None


def _resolve_unique_suffix(app, env, node, contnode):
    """A short name (``ConditionalVAE``) that exactly one documented genailab object ends with."""
    target = node.get("reftarget", "")
    if "." in target or not target:
        return None
    domain = env.get_domain("py")
    matches = [name for name in domain.objects if name.startswith("genailab") and name.rsplit(".", 1)[-1] == target]
    if len(matches) != 1:
        return None
    new = node.deepcopy()
    new["reftarget"] = matches[0]
    return domain.resolve_xref(env, node["refdoc"], app.builder, "obj", matches[0], new, contnode)


def escape_bars(app, what, name, obj, options, lines) -> None:
    """Docstrings write absolute values as ``|x|``; reStructuredText would read a substitution.

    Bars outside inline literals are escaped; table lines (starting with ``|`` or ``+``) are kept.
    """
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if "|" not in line or stripped.startswith(("|", "+", ">>>", "...")):
            continue
        parts = line.split("``")
        for j in range(0, len(parts), 2):  # even parts lie outside ``literals``
            parts[j] = parts[j].replace("|", "\\|")
        lines[i] = "``".join(parts)


def setup(app):
    app.connect("builder-inited", write_api_pages)
    app.connect("missing-reference", resolve_reexport)
    app.connect("autodoc-process-docstring", escape_bars)
    app.connect("autodoc-skip-member", skip_foreign_members)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
