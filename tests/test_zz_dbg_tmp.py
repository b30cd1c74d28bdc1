import sys
sys.path.insert(0, "/work/main/tests")
from test_cxr_bundles import *  # noqa
def test_dbg(data_dir, tmp_path, monkeypatch, capsys):
    test_jsrt_nodules_bundle_end_to_end.__wrapped__ if hasattr(test_jsrt_nodules_bundle_end_to_end, "__wrapped__") else None
    monkeypatch.setenv("MEDKT_DATA", str(data_dir))
    code, io = _cli(monkeypatch, capsys, "transfer", "--bundle", "chexpert_5x200c_medclip", "--output", str(tmp_path / "e"), "--set", "backend=medclip:tiny@random")
    manifest = tmp_path / "m.csv"
    manifest.write_text((data_dir / "jsrt" / "jsrt.csv").read_text() + "images/JPCLN009.IMG,lung cancer,,test,\n")
    code, io = _cli(monkeypatch, capsys, "transfer", "--bundle", "jsrt_nodules", "--output", str(tmp_path / "r"), "--set", "backend=medclip:tiny@random", "--set", f"jsrt_manifest={manifest}")
    print("ERR<<<", io.err, ">>>")
    assert 0
