"""The shape of the code (imports one way, MPI in comm.py, small modules) and the tensor-parallel
forward pass run in one process: one thread per rank, summing through a shared buffer, so the
split arithmetic is checked against transformers in milliseconds, without mpiexec."""
import ast
import os
import subprocess
import sys
import threading

import pytest
import torch

from mpitpi.checkpoint import open_checkpoint
from mpitpi.loader import open_rank
from mpitpi.model import Transformer
from mpitpi.shards import write_shards

import refmodels

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "mpitpi")


def _modules() -> dict[str, ast.Module]:
    return {name[:-3]: ast.parse(open(os.path.join(PACKAGE, name)).read())
            for name in os.listdir(PACKAGE) if name.endswith(".py")}


def _imports(tree: ast.Module) -> set[str]:
    """mpitpi modules a module imports anywhere, inside functions too."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mpitpi"):
            if node.module == "mpitpi":
                out.update(a.name for a in node.names)
            else:
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("mpitpi."))
    return out


def test_imports_have_no_cycle():
    mods = _modules()
    graph = {m: _imports(t) & set(mods) for m, t in mods.items()}
    state: dict[str, int] = {}   # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_imports_of_mpitpi_are_at_the_top_of_each_file():
    for name, tree in _modules().items():
        top = set()
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                top.update(_imports(ast.Module(body=[node], type_ignores=[])))
        assert _imports(tree) == top, f"{name}.py imports mpitpi modules inside functions"


def test_mpi_is_imported_in_comm_alone():
    for name, tree in _modules().items():
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if any(n.split(".")[0] == "mpi4py" for n in names):
            assert name == "comm", f"{name}.py imports mpi4py"


def test_no_module_is_over_500_lines():
    for name in os.listdir(PACKAGE):
        if name.endswith(".py"):
            n = len(open(os.path.join(PACKAGE, name)).readlines())
            assert n <= 500, f"{name} has {n} lines"


class ThreadReduce:
    """All-reduce over threads: rank r puts its tensor in slot r, every rank sums the slots
    in rank order (as the star all-reduce does), then all wait before the slots are reused."""

    def __init__(self, n: int):
        self.slots: list[torch.Tensor | None] = [None] * n
        self.barrier = threading.Barrier(n, timeout=60)

    def for_rank(self, r: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[r] = t.clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for s in self.slots[1:]:
                total += s
            self.barrier.wait()
            return t.copy_(total)
        return reduce


def run_ranks(folder: str, n: int, steps: list[torch.Tensor], starts: list[int],
              fused: bool = False, kv_dtype: str = "fp32"):
    """Every rank's Transformer in its own thread; returns, per forward pass, the full
    logits (ranks' vocabulary rows concatenated in rank order). ``fused``: one-token steps
    through the fused C step (fused_step.DecodeStep), else the torch path; ``kv_dtype``: what
    the KV caches store."""
    reduce = ThreadReduce(n)
    out: list[list[torch.Tensor]] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            args, plan, top, layers = open_rank(folder, r, n, None)
            model = Transformer(args, plan, r, top, layers, reduce=reduce.for_rank(r),
                                kv_dtype=kv_dtype)
            assert model.fused or not fused, "the fused step is not available"
            model.fused = fused
            model.reserve(starts[-1] + len(steps[-1]))
            for tokens, start in zip(steps, starts):
                out[r].append(model.forward(tokens, start))
        except BaseException as e:
            errors.append(e)
            reduce.barrier.abort()
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return [torch.cat([out[r][i] for r in range(n)]) for i in range(len(steps))]


CASES = [("llama-gqa", 2, None), ("llama-odd", 3, [2, 1, 1]), ("llama-mqa", 4, None),
         ("llama-mha", 3, [1, 1, 3]), ("qwen2", 2, [1, 3]), ("mistral", 3, None),
         ("llama-tied", 1, None), ("llama3-rope", 4, [1, 2, 2, 3])]


@pytest.mark.parametrize("name,n,ratios", CASES, ids=[f"{c[0]}-n{c[1]}" for c in CASES])
def test_tensor_parallel_forward_in_process_matches_transformers(models, tmp_path, name, n,
                                                                 ratios):
    folder, ref = models(name)
    write_shards(open_checkpoint(folder), str(tmp_path / "s"), n, ratios, "fp32",
                 progress=False)
    prompt = [1, 17, 42, 5, 99, 23, 7, 64, 11, 3, 150, 8]   # > mistral's sliding window of 8
    new = [31, 12, 77]
    steps = [torch.tensor(prompt)] + [torch.tensor([t]) for t in new]
    starts = [0] + [len(prompt) + i for i in range(len(new))]
    ours = torch.stack(run_ranks(str(tmp_path / "s"), n, steps, starts))      # (4, vocab)
    fused = torch.stack(run_ranks(str(tmp_path / "s"), n, steps, starts, fused=True))
    assert float((fused - ours).abs().max() / ours.abs().max()) < 1e-5
    expect = refmodels.reference_logits(ref, prompt, new + [0])               # (4, vocab)
    rel = float((ours - expect).abs().max() / expect.abs().max())
    assert rel < 1e-4, rel
    assert torch.equal(ours.argmax(-1), expect.argmax(-1))


def test_starting_mpitpi_does_not_import_torchs_compiler():
    """Every rank of every run imports the CLI: torch's compiler (torch._dynamo, pulled in
    by e.g. llguidance.torch's @torch.compile) would add about 2 s to each start."""
    r = subprocess.run([sys.executable, "-c", "import sys, mpitpi.cli; "
                        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout[:500] + r.stderr[-2000:]
