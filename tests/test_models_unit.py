"""Model pieces that need no second process: FLOP counts, pipeline splits, recompute, errors."""
from __future__ import annotations

import pytest

from megatron_senseflow.models import split_blocks, stage_layout, transformer_config
from megatron_senseflow.models import costs, flops
from megatron_senseflow.models.configs import make_arch


def test_flux_double_block_flops_by_hand():
    # one FLUX double block, batch 1, 4096 image + 512 text tokens, hidden 3072
    h, si, st = 3072, 4096, 512
    s = si + st
    adaln = 2 * (2 * h * 6 * h)  # two modulation linears on one conditioning row each
    qkv = 2 * s * h * 3 * h
    attn = 2 * 2 * s * s * h
    per_stream = lambda n: 2 * n * h * h + 2 * n * h * 4 * h + 2 * n * 4 * h * h  # out proj + MLP
    hand = adaln + qkv + attn + per_stream(si) + per_stream(st)
    assert costs.mmdit_block(1, si, st, h) == hand
    # about 0.36 TFLOP: sanity against the usual "24 h^2 s + 4 s^2 h" estimate
    assert abs(hand - (24 * h * h * s + 4 * s * s * h)) / hand < 0.01


def test_flux_single_block_flops_by_hand():
    h, s = 3072, 4608
    hand = 2 * h * 3 * h + 2 * s * h * 3 * h + 4 * s * s * h + 2 * s * h * 4 * h + 2 * s * 5 * h * h
    assert costs.flux_single_block(1, s, h) == hand


def test_full_flux_forward_flops_order_of_magnitude():
    arch = make_arch("flux-dev")
    f = flops.forward_flops(arch, 1, 4096, 512)
    # per token only ~6.5B of the 12B params act (one stream per token; adaLN is per sample):
    # 2 x 6.45e9 x 4608 = 59.5 TFLOP of linears + 57 x 4 x 4608^2 x 3072 = 14.9 TFLOP of attention
    assert abs(f - 74.4e12) / 74.4e12 < 0.01


def test_split_blocks_balances_cost():
    assert split_blocks([1, 1, 1, 1], 2) == [2, 2]
    assert split_blocks([4, 1, 1, 1, 1], 2) == [1, 4]
    assert split_blocks([1, 2, 3, 4, 5, 6], 3) == [3, 2, 1] or max(
        sum(c) for c in ([1, 2, 3], [4, 5], [6])
    ) >= 9
    sizes = split_blocks([3.0] * 19 + [2.9] * 38, 4)
    assert sum(sizes) == 57 and len(sizes) == 4


def test_stage_layout_explicit_and_default():
    arch = make_arch("flux-dev")
    lay = [stage_layout(arch, 4, r) for r in range(4)]
    assert lay[0].first == 0 and lay[-1].last == 57 and lay[0].pre_process and lay[-1].post_process
    assert all(a.last == b.first for a, b in zip(lay, lay[1:]))
    per_block = flops.block_costs(arch, 1, 4096, 512)
    stage_cost = [sum(per_block[x.first : x.last]) for x in lay]
    assert max(stage_cost) / min(stage_cost) < 1.1
    assert stage_layout(arch, 2, 1, split=[20, 37]).first == 20
    with pytest.raises(ValueError, match="must give 2 stages"):
        stage_layout(arch, 2, 0, split=[20, 30])


def test_tp_must_divide_heads_at_build():
    with pytest.raises(ValueError, match="tensor parallel size 5 does not divide FLUX's 24 attention heads"):
        transformer_config(make_arch("flux-dev"), tp=5)
    with pytest.raises(ValueError, match="does not divide SD3's 38 attention heads; use one of 1, 2, 19, 38"):
        transformer_config(make_arch("sd35-large"), tp=4)


def test_no_code_outside_models_branches_on_the_family():
    """A family is one place (models/<family>/, registered in models/registry.py): the rest of the code asks
    `family_of(arch)`. At most two lines may still test a family, each marked `# family branch:` with the reason."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"family\s*[!=]=\s*[\"']|[\"']\s*[!=]=\s*\w*family\b|\.family in |isinstance\([^)]*Arch\b|"
                         r"\b(FluxArch|SD3Arch|QwenImageArch|Flux2Arch)\b|is_flux|\barch\.label\s*==")
    hits = []
    for folder in ("megatron_senseflow", "data", "tools", "scripts", "slurm"):
        for path in (repo / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if pattern.search(code):
                    hits.append((f"{path.relative_to(repo)}:{n}", line.strip()))
    unmarked = [h for h in hits if "# family branch:" not in h[1]]
    assert not unmarked and len(hits) <= 2, hits


def test_imports_run_one_way():
    """No import circle among our modules (issue 29), counting imports inside functions too (a lazy import
    hides a circle, it does not remove it); only `if TYPE_CHECKING:` imports are left out."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    files = {}
    for folder, package in (("megatron_senseflow", "megatron_senseflow"), ("models", "megatron_senseflow.models"),
                            ("data", "megatron_senseflow.data"), ("tools", "megatron_senseflow.tools"),
                            ("slurm", "megatron_senseflow.slurm")):
        for path in (repo / folder).rglob("*.py"):
            rel = path.relative_to(repo / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            files[".".join([package, *parts])] = path
    modules = set(files)

    def target(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                for child in node.body for n in ast.walk(child)}
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # `from pkg import sub` imports the module pkg.sub; `from pkg import name` the package pkg
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges.update(t for t in map(target, names) if t and t != mod)
        graph[mod] = edges

    # depth-first search for a cycle; report one as a path
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in graph.get(m, ()):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import circle(s): " + "; ".join(" -> ".join(c) for c in cycles[:3])
