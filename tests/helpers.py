"""Small helpers shared by the method tests (pytest puts this folder on the import path)."""
import minipeft as mp


def copy_of(model):
    """An independent plain GPT with the same weights, in eval mode: the reference a test compares against."""
    twin = mp.GPT(model.config)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def state(model):
    """A snapshot of every tensor of ``model`` (to check later that nothing changed)."""
    return {k: v.clone() for k, v in model.state_dict().items()}
