# swarmota A/B slot selection for U-Boot (shipped as peer/bootscripts/boot.cmd;
# print it with `swarmota peer bootloader-script boot.cmd`; compile it with
# `mkimage -T script -d boot.cmd boot.scr`).
#
# The same rules as grub.cfg, on the environment the agent writes with fw_setenv
# (`peer init --bootloader uboot --uboot-env-config /etc/fw_env.config`): slots in
# SWARMOTA_ORDER; a slot with SWARMOTA_<X>_GOOD=1 boots as it is; another boots only if
# SWARMOTA_<X>_TRIES is above 0, after one try is taken off and saved (saveenv); a slot
# without tries is skipped. A blank environment is the factory state: slot a. Budgets
# of at most 9 (setexpr prints hexadecimal). Configure CONFIG_ENV_REDUNDANT (two copies)
# so that a power cut in saveenv leaves the other copy valid.

if test -z "${SWARMOTA_ORDER}"; then
  setenv SWARMOTA_ORDER "a b"; setenv SWARMOTA_A_GOOD 1; setenv SWARMOTA_B_GOOD 0
fi
setenv swarmota_slot
for swarmota_try in ${SWARMOTA_ORDER}; do
  if test -z "${swarmota_slot}"; then
    if test "${swarmota_try}" = a; then
      setenv swarmota_good "${SWARMOTA_A_GOOD}"; setenv swarmota_left "${SWARMOTA_A_TRIES}"
    else
      setenv swarmota_good "${SWARMOTA_B_GOOD}"; setenv swarmota_left "${SWARMOTA_B_TRIES}"
    fi
    if test "${swarmota_good}" = 1; then
      setenv swarmota_slot "${swarmota_try}"
    elif test -n "${swarmota_left}" && test "${swarmota_left}" -gt 0; then
      setexpr swarmota_left "${swarmota_left}" - 1
      if test "${swarmota_try}" = a; then
        setenv SWARMOTA_A_TRIES "${swarmota_left}"
      else
        setenv SWARMOTA_B_TRIES "${swarmota_left}"
      fi
      saveenv
      setenv swarmota_slot "${swarmota_try}"
    fi
  fi
done
if test -z "${swarmota_slot}"; then setenv swarmota_slot a; fi
setenv bootargs "${bootargs} root=PARTLABEL=rootfs-${swarmota_slot} swarmota.slot=${swarmota_slot}"
# then load and boot the kernel of your board, e.g.:
# load mmc 0:1 ${kernel_addr_r} Image && booti ${kernel_addr_r} - ${fdt_addr_r}
