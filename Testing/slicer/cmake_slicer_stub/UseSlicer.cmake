# See SlicerConfig.cmake beside this file: stand-ins for the Slicer and CTK macros the extension calls.

macro(ctkMacroCompilePythonScript)
  cmake_parse_arguments(MY "NO_INSTALL_SUBDIR;GLOBAL_TARGET" "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR"
    "SCRIPTS;RESOURCES" ${ARGN})
  if(NOT DEFINED MY_SOURCE_DIR)
    set(MY_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
  endif()
  get_filename_component(MY_SOURCE_DIR ${MY_SOURCE_DIR} REALPATH)
  set(_copied)
  foreach(file ${MY_SCRIPTS} ${MY_RESOURCES})
    if(IS_ABSOLUTE ${file})
      message(FATAL_ERROR "stand-in: absolute paths are not laid out below DESTINATION_DIR: ${file}")
    endif()
    add_custom_command(OUTPUT ${MY_DESTINATION_DIR}/${file}
      COMMAND ${CMAKE_COMMAND} -E copy ${MY_SOURCE_DIR}/${file} ${MY_DESTINATION_DIR}/${file}
      DEPENDS ${MY_SOURCE_DIR}/${file})
    list(APPEND _copied ${MY_DESTINATION_DIR}/${file})
  endforeach()
  add_custom_target(Copy${MY_TARGET_NAME}PythonFiles ALL DEPENDS ${_copied})
  set(_dir ${MY_DESTINATION_DIR})
  if(MY_NO_INSTALL_SUBDIR)
    set(_dir ${MY_DESTINATION_DIR}/)
  endif()
  install(DIRECTORY "${_dir}" DESTINATION "${MY_INSTALL_DIR}" COMPONENT RuntimeLibraries USE_SOURCE_PERMISSIONS)
endmacro()

macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_SLICER_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords given to slicerMacroBuildScriptedModule(): \"${MY_SLICER_UNPARSED_ARGUMENTS}\"")
  endif()
  foreach(value ${MY_SLICER_SCRIPTS} ${MY_SLICER_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${value} AND NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${value}.py)
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file or directory '${value}'")
    endif()
  endforeach()
  ctkMacroCompilePythonScript(
    TARGET_NAME ${MY_SLICER_NAME}
    SCRIPTS "${MY_SLICER_SCRIPTS}"
    RESOURCES "${MY_SLICER_RESOURCES}"
    DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}
    INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}
    NO_INSTALL_SUBDIR
    )
endmacro()

function(slicer_add_python_unittest)
endfunction()
