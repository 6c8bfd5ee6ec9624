"""Progress bars on long loops (calibration, perplexity, LAMBADA), through tqdm."""


def progress(items, enabled: bool, desc: str):
    """``items``, wrapped in a tqdm bar when ``enabled``; no bar when not on a terminal."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch", leave=False, disable=None)
