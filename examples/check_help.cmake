# Runs PROGRAM with --help (and -h) and passes when it exits 0, writes its usage to stdout and
# mentions every flag in FLAGS (a ;-list): how the examples' tests check that --help stays complete.
#   -DPROGRAM=<example> -DFLAGS=<--flag;--other-flag;...>
foreach(help --help -h)
  execute_process(COMMAND ${PROGRAM} ${help} RESULT_VARIABLE rc OUTPUT_VARIABLE out
                  ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${help}: expected exit 0, got '${rc}'\n${out}${err}")
  endif()
  if(NOT out MATCHES "^usage: ")
    message(FATAL_ERROR "${help}: expected the usage on stdout, got:\n${out}\nstderr:\n${err}")
  endif()
  foreach(flag IN LISTS FLAGS)
    string(FIND "${out}" "${flag}" position)
    if(position EQUAL -1)
      message(FATAL_ERROR "${help}: the help does not mention ${flag}:\n${out}")
    endif()
  endforeach()
endforeach()
message(STATUS "--help and -h list every flag:\n${out}")
