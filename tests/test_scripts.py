"""The benchmark scripts' shared helper that writes their tables into BENCHMARKS.md."""
import doctest
import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _benchmarks_md():
    spec = importlib.util.spec_from_file_location("benchmarks_md", SCRIPTS / "benchmarks_md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_new_table_joins_its_section_and_a_rerun_replaces_it_in_place(tmp_path):
    md = _benchmarks_md()
    assert doctest.testmod(md).failed == 0
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Dataset condensation\n\nnotes\n\n## int8 handoff\n\nmore\n")
    md.write_block("c-15m", "| first |", "Dataset condensation", path)
    md.write_block("c-15m", "| second |", "Dataset condensation", path)
    md.write_block("other", "| new |", "A new subject", path)
    text = path.read_text()
    assert text.count("## Dataset condensation") == 1 and "| first |" not in text
    assert text.index("notes") < text.index("| second |") < text.index("## int8 handoff") < text.index("more")
    assert text.rstrip().endswith("## A new subject\n\n<!-- other:start -->\n| new |\n<!-- other:end -->")
