"""examples/char_lm.py end to end, tiny: three trainings, convert, generate, the JSON record for the plots."""
import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_char_lm_example_tiny_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("char_lm_example", ROOT / "examples" / "char_lm.py")
    char_lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(char_lm)
    out = tmp_path / "char_lm.json"
    r = char_lm.main(["--steps", "4", "--dim", "32", "--layers", "1", "--ctx", "32", "--batch", "4",
                      "--corpus-bytes", "60000", "--eval-every", "2", "--weight-scale", "learned", "--json", str(out)])
    assert set(r) >= {"fp32", "ternary QAT", "ternary QAT + warm-up"}
    record = json.loads(out.read_text())
    assert [p[0] for p in record["curves"]["fp32"]] == [2, 4]
    assert record["sizes"]["converted"] < record["sizes"]["fp32"]
    assert "Validation perplexity" in capsys.readouterr().out
