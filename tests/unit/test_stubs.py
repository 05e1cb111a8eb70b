from pathlib import Path

from splitwise.rpc.generate import STUB_DIR, generate


def test_generated_stubs_match_protos(tmp_path: Path):
    fresh = {p.name: p.read_text() for p in generate(tmp_path)}
    committed = {p.name: p.read_text() for p in STUB_DIR.iterdir() if p.is_file()}
    stale = sorted(name for name in fresh if committed.get(name) != fresh[name])
    extra = sorted(set(committed) - set(fresh))
    assert not stale and not extra, (
        f"stubs out of date with protos/ (stale {stale}, extra {extra}); run: python -m splitwise.rpc.generate"
    )
