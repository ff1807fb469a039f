"""Files shipped *inside* a Hugging Face export of an AttnRes model, loaded with ``trust_remote_code=True``.

``configuration_attnres.py`` and ``modeling_attnres.py`` are copied verbatim into the export directory by
:func:`attnres_train.interop.hf_remote.write_remote_directory`; config.json's ``auto_map`` points at them. They
import only torch and transformers (never ``attnres_train``), so the export works on a machine without this
package. This package marker exists so setuptools ships the two files and tests can import them directly.
"""
