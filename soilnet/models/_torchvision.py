"""Import torchvision's model code even where its compiled operators cannot load.

PyPI's torchvision wheels link their C++ operators against CUDA builds of torch; beside the CPU-only torch
wheel that CI installs, loading them fails and ``import torchvision`` then fails while registering meta kernels
for operators (nms, roi_align) that SoilNet never uses. The ResNet and VGG definitions are pure Python, so
we skip that registration only in that case; on a GPU install torchvision imports untouched.
"""

from __future__ import annotations

import sys
import types


def torchvision_models():
    """``torchvision.models``, importable on CPU-only torch builds too."""
    try:
        import torchvision.models as models
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision.models as models
    return models
