# A stand-in for a Slicer build tree's SlicerConfig.cmake, for configuring, building and installing the extension in
# a test without Slicer. It provides only what MedGMAESlicer's CMakeLists use, with the behaviour of the real macros:
# - slicerMacroBuildScriptedModule: Slicer's CMake/SlicerMacroBuildScriptedModule.cmake (v5.10.0) - checks that every
#   script and resource exists, then ctkMacroCompilePythonScript into ${Slicer_QTSCRIPTEDMODULES_LIB_DIR} with
#   NO_INSTALL_SUBDIR;
# - ctkMacroCompilePythonScript: CTK's CMake/ctkMacroCompilePythonScript.cmake - each script and resource is copied at
#   build time from SOURCE_DIR/<relative path> to DESTINATION_DIR/<relative path>, and DESTINATION_DIR/ is installed
#   into INSTALL_DIR (byte compilation is left out);
# - slicer_add_python_unittest: no tests are registered here.
set(Slicer_VERSION_MAJOR 5)
if(NOT DEFINED STUB_SLICER_VERSION_MINOR)
  set(STUB_SLICER_VERSION_MINOR 10)
endif()
set(Slicer_VERSION_MINOR ${STUB_SLICER_VERSION_MINOR})
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-${Slicer_VERSION_MAJOR}.${Slicer_VERSION_MINOR}/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
set(Slicer_USE_PYTHONQT ON)
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Nothing.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Nothing.cmake)
