import os
import sys
import warnings

# The verifier runs between passes everywhere in the test suite (graph lint, group sizes agree with
# weight shapes, analysis passes leave the graph unchanged).
os.environ.setdefault("FXPRUNE_VERIFY", "1")
# The library has no default data location: the tests read the shared CIFAR-10 copy beside the repository.
os.environ.setdefault("FXPRUNE_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", category=FutureWarning)
