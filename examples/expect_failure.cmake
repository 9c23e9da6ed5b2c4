# Runs COMMAND (a ;-list) and passes when it exits non-zero, without a crash, and its output
# matches EXPECT: how the examples' tests check that bad input gets a clear message.
execute_process(COMMAND ${COMMAND} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0)
  message(FATAL_ERROR "expected a non-zero exit, got 0\n${out}${err}")
endif()
if(NOT rc MATCHES "^[0-9]+$")
  message(FATAL_ERROR "expected an orderly exit, got '${rc}'\n${out}${err}")
endif()
if(NOT "${out}${err}" MATCHES "${EXPECT}")
  message(FATAL_ERROR "expected output matching '${EXPECT}', got:\n${out}${err}")
endif()
message(STATUS "exit ${rc}: ${err}")
