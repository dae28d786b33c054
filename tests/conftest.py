import os
import sys
import warnings

# The verifier runs between passes everywhere in the test suite (graph lint, group sizes agree with
# weight shapes, analysis passes leave the graph unchanged).
os.environ.setdefault("FXPRUNE_VERIFY", "1")
sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", category=FutureWarning)
