import pytest


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A small TopK run on the bundled digits: (run directory, held-out metrics)."""
    import flashsae

    out = tmp_path_factory.mktemp("viz") / "digits"
    _, result = flashsae.train("digits", out=out, quiet=True, rows=1500, latents=32, k=4)
    return result.run_dir, result.metrics
