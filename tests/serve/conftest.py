import pytest

from serving import make_engine


@pytest.fixture
def engine(tmp_path):
    eng = make_engine(tmp_path / "state")
    yield eng
    eng.shutdown()
