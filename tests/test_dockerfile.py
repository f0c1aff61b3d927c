"""The Dockerfile a Hugging Face Space builds: its essentials read from the file (no container engine needed), what
it copies present and not left out by .dockerignore, and the README's front matter for the Space."""
import ast
import fnmatch
import os
import re
import shlex

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_PARTY = {"benchmarks", "config", "data", "evaluation", "models", "reports", "training", "utils"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) per Dockerfile line, continuation lines joined, comments left out."""
    with open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8") as f:
        text = re.sub(r"\\\n", " ", f.read())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def arguments(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def copy_sources() -> list[str]:
    """Every COPY's sources (its last word is the destination; --chown and such are flags)."""
    sources = []
    for rest in arguments("COPY"):
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        sources += words[:-1]
    return sources


def ignored(path: str) -> bool:
    """Whether .dockerignore leaves path (relative, / separated) out of the build context: a pattern matches it or
    a folder above it (the patterns used here: names, folder/ and **/name; no ! exceptions)."""
    with open(os.path.join(ROOT, ".dockerignore"), encoding="utf-8") as f:
        patterns = [p.strip().rstrip("/") for p in f if p.strip() and not p.startswith("#")]
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(prefix, p) or (p.startswith("**/") and fnmatch.fnmatch(prefix.split("/")[-1], p[3:]))
               for p in patterns for prefix in prefixes)


def test_a_slim_python_base_and_a_non_root_user_of_uid_1000():
    (base,) = arguments("FROM")
    assert re.fullmatch(r"python:3\.\d+-slim", base)
    assert any(re.search(r"useradd .*--uid 1000 user|useradd .*-u 1000 user", r) for r in arguments("RUN"))
    users = arguments("USER")
    assert users == ["user"]
    order = [word for word, _ in instructions()]
    assert order.index("USER") > max(i for i, word in enumerate(order) if word == "RUN")   # installs ran as root
    assert any(r.startswith("HOME=/home/user") for r in arguments("ENV"))


def test_the_cpu_build_of_torch_then_the_apps_requirements():
    runs = arguments("RUN")
    torch_line = next(r for r in runs if "torch" in r)
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_line
    assert runs.index(torch_line) < next(i for i, r in enumerate(runs) if "requirements-app.txt" in r)


def test_streamlit_serves_app_py_on_port_8501_on_every_address():
    assert arguments("EXPOSE") == ["8501"]
    (cmd,) = arguments("CMD")
    words = ast.literal_eval(cmd)
    assert words[:3] == ["streamlit", "run", "app.py"]
    assert "--server.address=0.0.0.0" in words and "--server.port=8501" in words


def test_every_copied_path_exists_and_is_not_dockerignored():
    sources = copy_sources()
    assert {"pretrained/", "examples/", "app.py", "requirements-app.txt"} <= set(sources)
    for source in sources:
        assert os.path.exists(os.path.join(ROOT, source)), source
        assert not ignored(source), source
    assert ignored(".venv/bin/python") and ignored("models/__pycache__/x.pyc") and ignored("runs/demo")
    assert ignored(".git") and ignored("cache/features") and not ignored("models/decoding.py")


def test_the_image_holds_every_module_the_app_imports():
    """The first-party modules app.py imports, and theirs in turn, lie in what the Dockerfile copies."""
    copied = {s.rstrip("/") for s in copy_sources()}
    todo, seen = ["app.py"], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                if name.split(".")[0] in FIRST_PARTY:
                    module = name.replace(".", "/")
                    found = next((p for p in (module + ".py", module + "/__init__.py")
                                  if os.path.isfile(os.path.join(ROOT, p))), None)
                    if found:
                        todo.append(found)
    for path in seen:
        assert path in copied or path.split("/")[0] in copied, f"{path} is imported by the app but not copied"


def test_the_readme_gives_the_spaces_front_matter():
    for readme in ("README.md", "README.zh-CN.md"):
        with open(os.path.join(ROOT, readme), encoding="utf-8") as f:
            text = f.read()
        blocks = [yaml.safe_load(b.replace("\n   ", "\n").strip().strip("-"))
                  for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "sdk:" in b]
        assert len(blocks) == 1, readme
        (meta,) = blocks
        assert meta["sdk"] == "docker" and meta["app_port"] == 8501 and meta["pinned"] is False, readme
        assert {"title", "emoji", "colorFrom", "colorTo"} <= set(meta), readme
        assert "sdk: streamlit" not in text, readme
