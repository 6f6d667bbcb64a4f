import pytest

from mltl_dermoscopy import synthetic


@pytest.fixture(scope="session")
def ham_folder(tmp_path_factory):
    """A synthetic HAM10000-style folder: metadata.csv and images/, 6 lesions per class, 1-3 photographs each."""
    return synthetic.generate(tmp_path_factory.mktemp("ham") / "data", lesions_per_class=6, seed=4)
