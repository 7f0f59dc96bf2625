"""Model families behind one contract (:mod:`onedc.families.contract`): ``light`` and ``reference``.

``family_of(model_config)`` gives the family object of a model config dict; importing this
package registers both families.
"""
from onedc.families.contract import (
    BUNDLE_PARTS,
    FAMILIES,
    GENERATOR_DECODE_SETTINGS,
    CodecPass,
    FamilyCodec,
    ModelFamily,
    family_of,
    generator_settings,
    load_part,
    register_family,
    split_parts,
    weights_only_config,
)
from onedc.families.light import LIGHT, LightFamily
from onedc.families.reference import REFERENCE, ReferenceFamily

__all__ = [
    "BUNDLE_PARTS", "FAMILIES", "GENERATOR_DECODE_SETTINGS", "LIGHT", "REFERENCE", "CodecPass", "FamilyCodec",
    "LightFamily", "ModelFamily", "ReferenceFamily", "family_of", "generator_settings", "load_part",
    "register_family", "split_parts", "weights_only_config",
]
