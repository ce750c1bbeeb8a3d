"""bench.loader runs end to end at the tiny size (a smoke test; speed is never asserted)."""

import json

from bench.loader import main


def test_bench_loader_tiny(tmp_path, capsys):
    result = main(["--tiny", "--json", str(tmp_path / "loader.json")])
    with open(tmp_path / "loader.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(result))
    for key in ("ours_images_per_s", "pillow_images_per_s", "speedup"):
        assert saved[key] > 0
    assert set(saved["decode_images_per_s_one_core"]) == {"simplejpeg", "pillow"}
    assert saved["workers"] == 1 and saved["output_size"] == 32
    assert "speed-up" in capsys.readouterr().out
